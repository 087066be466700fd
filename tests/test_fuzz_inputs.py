"""Property tests (issue 13): malformed safetensors headers and plans are SimMergeErrors, never another
exception; what is accepted can then be used (every tensor read, every plan step validated)."""

from __future__ import annotations

import contextlib
import json
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simmerge.checkpoint import DTYPES, Checkpoint
from simmerge.engine import _resolve_step
from simmerge.errors import SimMergeError
from simmerge.plan import Plan

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
small_ints = st.integers(min_value=-3, max_value=70)


@st.composite
def tensor_entries(draw: st.DrawFn) -> Any:
    """Mostly header-shaped entries with one or more fields wrong, sometimes anything at all."""
    if draw(st.integers(0, 5)) == 0:
        return draw(json_values)
    entry: dict[str, Any] = {
        "dtype": draw(st.sampled_from([*DTYPES, "F128", "", "f32"]) | json_values),
        "shape": draw(st.lists(small_ints, max_size=3) | json_values),
        "data_offsets": draw(st.lists(st.integers(-4, 300), min_size=0, max_size=3) | json_values),
    }
    for key in draw(st.sets(st.sampled_from(list(entry)), max_size=1)):
        del entry[key]
    return entry


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64))
    header: Any
    if draw(st.integers(0, 9)) == 0:
        header = draw(json_values)
    else:
        names = draw(st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3, unique=True))
        header = {name: draw(tensor_entries()) for name in names}
        if draw(st.booleans()):
            header["__metadata__"] = draw(json_values)
    encoded = json.dumps(header).encode()
    length = len(encoded) + draw(st.sampled_from([0, 0, 0, -1, 1, 10**6, 2**63]))
    data = draw(st.binary(max_size=300))
    return struct.pack("<Q", max(0, min(length, 2**64 - 1))) + encoded + data


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Path(directory) / "ckpt"
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text("{}")
        yield checkpoint


@FUZZ
@given(content=safetensors_files())
def test_malformed_safetensors_are_simmerge_errors(scratch: Path, content: bytes) -> None:
    (scratch / "model.safetensors").write_bytes(content)
    try:
        checkpoint = Checkpoint.open(scratch)
    except SimMergeError as exc:
        assert str(scratch) in str(exc)  # the file, or the directory when it holds no tensor
        return
    for name in checkpoint.names():  # accepted means readable, as declared
        tensor = checkpoint.read(name)
        assert tuple(tensor.shape) == checkpoint.tensors[name].shape
    checkpoint.content_hash()


plan_keys = st.sampled_from(
    ["merge_method", "base_model", "models", "parameters", "dtype", "name", "tokenizer_source", "slices", "x"]
)
model_entries = st.one_of(
    st.sampled_from(["a", "b", "c", "s1", "s2"]),
    st.fixed_dictionaries(
        {"model": st.sampled_from(["a", "b", "s1", "s2"]) | json_values},
        optional={
            "parameters": st.dictionaries(st.sampled_from(["weight", "density", "t", "z"]), json_values)
        },
    ),
    json_values,
)


@st.composite
def plan_documents(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 7)) == 0:
        return draw(json_values)
    doc: dict[Any, Any] = {
        "merge_method": draw(
            st.sampled_from(["linear", "ties", "slerp", "task_arithmetic", "nope"]) | json_values
        ),
        "models": draw(st.lists(model_entries, max_size=3) | json_values),
    }
    for key in draw(st.sets(plan_keys, max_size=3)):
        doc[key] = draw(st.sampled_from(["a", "s1", "s2", "float16"]) | json_values)
    if draw(st.booleans()):
        doc["name"] = draw(st.sampled_from(["s1", "s2"]))
    return doc


def _use(plan: Plan) -> None:
    """What the engine does with a plan before it opens a checkpoint: validate every step."""
    leaves = {leaf: None for leaf in plan.checkpoints()}
    for index, step in enumerate(plan.steps):
        _resolve_step(step, index, plan.step_names(), leaves)  # type: ignore[arg-type]
    Plan.from_yaml(plan.to_yaml())
    plan.describe()
    plan.plan_id()


@FUZZ
@given(docs=st.lists(plan_documents(), min_size=1, max_size=3), raw=st.none() | st.text(max_size=40))
def test_malformed_plan_yaml_is_a_simmerge_error(docs: list[Any], raw: str | None) -> None:
    text = raw if raw is not None else yaml.safe_dump_all(docs)
    with contextlib.suppress(SimMergeError):
        _use(Plan.from_yaml(text))
    with contextlib.suppress(SimMergeError):
        _use(Plan.from_dict({"steps": docs, "dtype": "float16"}))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A service whose catalog holds `a` and `b` (plans may name them), jobs not started."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ServiceSettings
    from tests.factories import derive_expert, write_tiny_llama
    from tests.test_service_support import auth, token_settings

    root = tmp_path_factory.mktemp("fuzz-service")
    a = write_tiny_llama(root / "roots" / "a", seed=0)
    b = derive_expert(a, root / "roots" / "b", seed=1)
    settings = ServiceSettings(
        home=root / "home",
        database_url=f"sqlite:///{root / 'service.db'}",
        catalog_roots=[root / "roots"],
        tokens=token_settings(),
        start_jobs=False,
    )
    with TestClient(create_app(settings, selector=None)) as client:
        for path in (a, b):
            assert client.post("/v1/checkpoints", json={"path": str(path)}, headers=auth("writer")).is_success
        yield client, auth("writer")


@settings(FUZZ, max_examples=60)
@given(docs=st.lists(plan_documents(), min_size=1, max_size=3))
def test_malformed_plans_are_never_a_server_error(service: Any, docs: list[Any]) -> None:
    client, headers = service
    for body in (
        {"name": "fz", "mergekit_yaml": yaml.safe_dump_all(docs)},
        {"name": "fz", "plan": {"steps": docs}},
    ):
        payload = json.dumps(body).encode()  # NaN/Infinity are not JSON: the service answers 422
        response = client.post(
            "/v1/merges", content=payload, headers={**headers, "Content-Type": "application/json"}
        )
        assert response.status_code < 500, response.text
