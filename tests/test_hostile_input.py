"""Hostile input (issue 13): every class of bad checkpoint, file, plan and CLI argument is a one-line
`error:` with exit code 2 naming the value, or a 4xx in the REST API; nothing outside the roots is
read, no pickle is loaded, and no output replaces an input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from simmerge.checkpoint import Checkpoint
from simmerge.cli import main
from simmerge.errors import CheckpointError, PlanError, SimMergeError
from simmerge.evaluation import load_model, load_probes
from simmerge.plan import Plan
from tests.factories import derive_expert, write_tiny_llama
from tests.test_service_support import auth, token_settings


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile") / "roots"
    base = write_tiny_llama(root / "base", seed=0)
    return {
        "base": base,
        "a": derive_expert(base, root / "a", seed=1),
        "b": derive_expert(base, root / "b", seed=2),
    }


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """Run `simmerge --home <tmp> ARGS` in-process: (exit code, stderr)."""

    def run(*args: object) -> tuple[int, str]:
        previous = signal.getsignal(signal.SIGTERM)
        capsys.readouterr()
        try:
            main(["--home", str(tmp_path / "home"), *map(str, args)])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        finally:
            signal.signal(signal.SIGTERM, previous)
        return code, capsys.readouterr().err

    return run


def assert_one_line_error(result: tuple[int, str], *needles: object) -> str:
    code, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def client(tmp_path: Path, family: dict[str, Path]) -> Iterator[TestClient]:
    from service.app import create_app
    from service.settings import ServiceSettings

    settings = ServiceSettings(
        home=tmp_path / "service",
        database_url=f"sqlite:///{tmp_path / 'service.db'}",
        catalog_roots=[family["base"].parent],
        tokens=token_settings(),
        start_jobs=False,
    )
    with TestClient(create_app(settings, selector=None)) as test_client:
        yield test_client


def register(client: TestClient, path: Path | str, name: str | None = None) -> Any:
    body = {"path": str(path), **({"name": name} if name else {})}
    return client.post("/v1/checkpoints", json=body, headers=auth("writer"))


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def write_safetensors(path: Path, header: Any, data: bytes = b"", raw_length: int | None = None) -> Path:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(encoded) if raw_length is None else raw_length
    path.write_bytes(struct.pack("<Q", length) + encoded + data)
    return path


def raw_checkpoint(path: Path, header: Any, data: bytes = b"", raw_length: int | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    write_safetensors(path / "model.safetensors", header, data, raw_length)
    return path


# ---- roots: every file a checkpoint reads --------------------------------------------------------
def test_a_symlinked_file_outside_the_roots_is_refused_naming_it(
    client: TestClient, family: dict[str, Path], tmp_path: Path
) -> None:
    roots = family["base"].parent
    outside = copy_checkpoint(family["a"], tmp_path / "outside")
    for name in ("model.safetensors", "config.json"):
        inside = copy_checkpoint(family["a"], roots / f"link-{name}")
        try:
            (inside / name).unlink()
            (inside / name).symlink_to(outside / name)
            response = register(client, inside)
            assert response.status_code == 400, response.text
            message = response.json()["error"]["message"]
            assert str(inside / name) in message and "outside the catalog roots" in message
        finally:
            shutil.rmtree(inside)
    assert client.get("/v1/checkpoints").json()["total"] == 0


def test_a_symlinked_tokenizer_outside_the_roots_is_refused(
    client: TestClient, family: dict[str, Path], tmp_path: Path
) -> None:
    inside = copy_checkpoint(family["a"], family["base"].parent / "tok-link")
    try:
        (tmp_path / "secret.json").write_text("{}")
        (inside / "tokenizer.json").symlink_to(tmp_path / "secret.json")
        response = register(client, inside)
        assert response.status_code == 400 and "tokenizer.json" in response.json()["error"]["message"]
    finally:
        shutil.rmtree(inside)


def test_a_weight_map_leaving_the_directory_is_refused(
    client: TestClient, family: dict[str, Path], tmp_path: Path, cli: Callable[..., tuple[int, str]]
) -> None:
    inside = copy_checkpoint(family["a"], family["base"].parent / "escape-index")
    try:
        names = list(Checkpoint.open(inside).tensors)
        weight_map = {name: "../../outside/x.safetensors" for name in names}
        (inside / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        response = register(client, inside)
        assert response.status_code == 400
        assert "../../outside/x.safetensors" in response.json()["error"]["message"]
        assert_one_line_error(cli("catalog", "add", inside), "../../outside/x.safetensors")
    finally:
        shutil.rmtree(inside)


def test_a_nul_byte_in_a_path_is_an_error(client: TestClient, cli: Callable[..., tuple[int, str]]) -> None:
    response = register(client, "/tmp/a\0b")
    assert response.status_code == 400 and "NUL" in response.json()["error"]["message"]
    with pytest.raises(SimMergeError, match="NUL"):
        Checkpoint.open("a\0b")
    plan = 'merge_method: linear\nmodels:\n  - model: "a\\0b"\n  - model: c\n'
    yaml_response = client.post(
        "/v1/merges", json={"name": "nul", "mergekit_yaml": plan}, headers=auth("writer")
    )
    assert 400 <= yaml_response.status_code < 500


# ---- safetensors headers ---------------------------------------------------------------------------
GOOD = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
MALFORMED_HEADERS: list[tuple[str, Any, int, str]] = [
    ("list", [GOOD], 16, "JSON list, not an object"),
    ("entry not an object", {"w": [1, 2]}, 16, "'w' is described by a JSON list"),
    ("no data_offsets", {"w": {"dtype": "F32", "shape": [4]}}, 16, "'w' has data_offsets None"),
    ("data_offsets of one", {"w": {**GOOD, "data_offsets": [0]}}, 16, "'w' has data_offsets [0]"),
    ("data_offsets strings", {"w": {**GOOD, "data_offsets": ["0", "16"]}}, 16, "'w' has data_offsets"),
    ("reversed range", {"w": {**GOOD, "data_offsets": [16, 0]}}, 16, "'w' has byte range"),
    ("negative shape", {"w": {**GOOD, "shape": [-4]}}, 16, "'w' has shape [-4]"),
    ("float shape", {"w": {**GOOD, "shape": [4.0]}}, 16, "'w' has shape [4.0]"),
    ("shape not a list", {"w": {**GOOD, "shape": 4}}, 16, "'w' has shape 4"),
    ("unknown dtype", {"w": {**GOOD, "dtype": "F128"}}, 16, "'w' has unsupported dtype 'F128'"),
    ("dtype a list", {"w": {**GOOD, "dtype": ["F32"]}}, 16, "'w' has unsupported dtype ['F32']"),
    ("shape over range", {"w": {**GOOD, "shape": [65], "data_offsets": [0, 256]}}, 256, "'w' has shape [65]"),
    ("metadata a list", {"__metadata__": [], "w": GOOD}, 16, "__metadata__ is not an object"),
]


@pytest.mark.parametrize(("header", "data_bytes", "needle"), [c[1:] for c in MALFORMED_HEADERS],
                         ids=[c[0] for c in MALFORMED_HEADERS])  # fmt: skip
def test_malformed_headers_name_file_and_tensor(
    tmp_path: Path, header: Any, data_bytes: int, needle: str
) -> None:
    target = raw_checkpoint(tmp_path / "bad", header, b"\0" * data_bytes)
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint.open(target)
    assert str(target / "model.safetensors") in str(excinfo.value) and needle in str(excinfo.value)


@pytest.mark.parametrize(
    ("write", "needle"),
    [
        (lambda p: raw_checkpoint(p, b'{"w": ', raw_length=10**6), "runs past the end of the file"),
        (lambda p: raw_checkpoint(p, b"\xff\xfe{}"), "not valid JSON"),
        (lambda p: (raw_checkpoint(p, {"w": GOOD}, b"\0" * 16), (p / "config.json").write_text("[1]")),
         "config.json: holds a JSON list"),
        (lambda p: (raw_checkpoint(p, {"w": GOOD}, b"\0" * 16), (p / "config.json").write_bytes(b"\xff")),
         "config.json: invalid JSON"),
        (lambda p: (raw_checkpoint(p, {"w": GOOD}, b"\0" * 16),
                    (p / "config.json").write_text('{"architectures": 5}')), "'architectures'"),
        (lambda p: (raw_checkpoint(p, {"w": GOOD}, b"\0" * 16),
                    (p / "model.safetensors.index.json").write_text('{"weight_map": ["x"]}')), "weight_map"),
        (lambda p: (raw_checkpoint(p, {"w": GOOD}, b"\0" * 16),
                    (p / "model.safetensors.index.json").write_text("[]")), "index.json: holds a JSON list"),
        (lambda p: (raw_checkpoint(p, {"w": GOOD}, b"\0" * 16),
                    write_safetensors(p / "b.safetensors", {"w": GOOD}, b"\0" * 16),
                    (p / "model.safetensors.index.json").write_text(
                        json.dumps({"weight_map": {"w": "model.safetensors", "v": "b.safetensors"}}))),
         "'w' is in both"),
    ],
)  # fmt: skip
def test_malformed_files_name_the_file(tmp_path: Path, write: Callable[[Path], Any], needle: str) -> None:
    target = tmp_path / "bad"
    write(target)
    with pytest.raises(CheckpointError) as excinfo:
        Checkpoint.open(target)
    assert str(target) in str(excinfo.value) and needle in str(excinfo.value)


def test_malformed_header_through_cli_and_rest(
    client: TestClient, family: dict[str, Path], cli: Callable[..., tuple[int, str]], tmp_path: Path
) -> None:
    header = {"w": {"dtype": "F32", "shape": [65], "data_offsets": [0, 256]}}
    inside = raw_checkpoint(family["base"].parent / "shape-mismatch", header, b"\0" * 256)
    try:
        response = register(client, inside)
        assert response.status_code == 400 and "[65]" in response.json()["error"]["message"]
        assert_one_line_error(cli("catalog", "add", inside), inside / "model.safetensors", "'w'")
        result = cli("merge", "--method", "linear", "--models", inside, family["a"], "--out", tmp_path / "o")
        assert_one_line_error(result, "'w'")
    finally:
        shutil.rmtree(inside)


# ---- pickle ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_only_checkpoints_are_refused_naming_the_file(
    tmp_path: Path, cli: Callable[..., tuple[int, str]], weights: str
) -> None:
    target = tmp_path / "pickled"
    target.mkdir()
    (target / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (target / weights).write_bytes(b"\x80\x04K\x01.")  # a valid pickle: it must never be opened
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    assert_one_line_error(
        cli("eval", target, "--tasks", tmp_path / "t.jsonl"), target / weights, "safetensors"
    )
    with pytest.raises(CheckpointError, match=weights):
        load_model(target)


# ---- outputs never replace inputs ------------------------------------------------------------------
def test_overwrite_never_replaces_an_input_or_a_registered_checkpoint(
    tmp_path: Path, family: dict[str, Path], cli: Callable[..., tuple[int, str]]
) -> None:
    a = copy_checkpoint(family["a"], tmp_path / "a")
    b = copy_checkpoint(family["b"], tmp_path / "b")
    other = copy_checkpoint(family["base"], tmp_path / "registered")
    before = Checkpoint.open(a).content_hash()
    merge = ["merge", "--method", "linear", "--models", a, b, "--param", "weight=1", "--no-progress"]
    assert_one_line_error(cli(*merge, "--out", a, "--overwrite"), a, "an input")
    assert_one_line_error(cli(*merge, "--out", a / "inside", "--overwrite"), "lies inside", a)
    assert_one_line_error(cli(*merge, "--out", tmp_path, "--overwrite"), "contains", a)
    assert cli("catalog", "add", other)[0] == 0
    assert_one_line_error(cli(*merge, "--out", other, "--overwrite"), other, "registered checkpoint")
    assert Checkpoint.open(a).content_hash() == before and Checkpoint.open(other).names()
    assert not list(tmp_path.glob(".*partial*")) and not (a / "inside").exists()


def test_zoo_build_force_never_replaces_a_registered_checkpoint(
    tmp_path: Path, family: dict[str, Path], cli: Callable[..., tuple[int, str]]
) -> None:
    zoo = tmp_path / "zoo"
    kept = copy_checkpoint(family["base"], zoo / "kept")
    assert cli("catalog", "add", kept)[0] == 0
    before = Checkpoint.open(kept).content_hash()
    assert_one_line_error(cli("zoo", "build", zoo, "--force", "--no-progress"), "contains", kept, "DIRECTORY")
    assert Checkpoint.open(kept).content_hash() == before and sorted(p.name for p in zoo.iterdir()) == [
        "kept"
    ]


# ---- plans -----------------------------------------------------------------------------------------
def chain(*steps: tuple[str, list[str]]) -> str:
    docs = [
        f"name: {name}\nmerge_method: linear\nmodels:\n"
        + "".join(f"  - model: {m}\n    parameters: {{weight: 1}}\n" for m in models)
        for name, models in steps
    ]
    return "---\n".join(docs)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (chain(("s1", ["s1", "b"])), "step 's1' lists itself"),
        (chain(("s1", ["s2", "b"]), ("s2", ["s1", "b"])), "'s1' -> 's2' -> 's1' form a cycle"),
        (chain(("s1", ["s2", "b"]), ("s2", ["a", "b"])), "step 's1' uses step 's2', which comes after it"),
        ("merge_method: linear\ndtype: [1]\nmodels: [a, b]\n", "'dtype' must be a string"),
        ("merge_method: linear\nname: [1]\nmodels: [a, b]\n", "'name' must be a string"),
        ("merge_method: linear\nbase_model: {x: 1}\nmodels: [a, b]\n", "'base_model' must be a string"),
        ("merge_method: [linear]\nmodels: [a, b]\n", "'merge_method' must be a string"),
        ("merge_method: linear\nmodels: [a, b]\nparameters: {1: 2}\n", "parameter names must be strings"),
        ("merge_method: linear\nmodels: [a, b]\n1: x\nfoo: y\n", "unknown key '1'"),
        ("- 1\n- 2\n", "document 1 is not a mapping"),
    ],
)
def test_bad_plans_are_refused_before_any_work(
    text: str, needle: str, tmp_path: Path, cli: Callable[..., tuple[int, str]]
) -> None:
    with pytest.raises(PlanError) as excinfo:
        Plan.from_yaml(text)
    assert needle in str(excinfo.value)
    (tmp_path / "plan.yaml").write_text(text)
    assert_one_line_error(cli("merge", "--config", tmp_path / "plan.yaml", "--out", tmp_path / "o"), needle)


def test_a_non_utf8_plan_file_is_named(tmp_path: Path, cli: Callable[..., tuple[int, str]]) -> None:
    (tmp_path / "plan.yaml").write_bytes(b"merge_method: linear\nmodels: [\xff]\n")
    result = cli("merge", "--config", tmp_path / "plan.yaml", "--out", tmp_path / "o")
    assert_one_line_error(result, tmp_path / "plan.yaml", "not UTF-8")


def test_rest_refuses_cyclic_and_mistyped_plans_before_queueing(
    client: TestClient, family: dict[str, Path]
) -> None:
    assert register(client, family["base"], "base").status_code == 201
    assert register(client, family["a"], "a").status_code == 201
    post = lambda body: client.post("/v1/merges", json=body, headers=auth("writer"))  # noqa: E731
    cyclic = post({"name": "loop", "mergekit_yaml": chain(("s1", ["s2", "a"]), ("s2", ["s1", "a"]))})
    assert cyclic.status_code == 400 and "cycle" in cyclic.json()["error"]["message"]
    selfish = post({"name": "me", "plan": {"steps": [{"name": "s", "merge_method": "linear",
                                                      "models": [{"model": "s"}, {"model": "a"}]}]}})  # fmt: skip
    assert selfish.status_code == 400 and "'s' lists itself" in selfish.json()["error"]["message"]
    typed = post({"name": "t", "mergekit_yaml": "merge_method: linear\ndtype: [1]\nmodels: [a, base]\n"})
    assert typed.status_code == 400 and "'dtype'" in typed.json()["error"]["message"]
    steps_not_list = post({"name": "t", "plan": {"steps": {"a": 1}}})
    assert steps_not_list.status_code == 400
    assert client.get("/v1/jobs").json()["total"] == 0


# ---- CLI arguments, files and the disk -------------------------------------------------------------
def test_unknown_device_is_named(
    tmp_path: Path, family: dict[str, Path], cli: Callable[..., tuple[int, str]]
) -> None:
    merge = ["merge", "--method", "linear", "--models", family["a"], family["b"], "--out", tmp_path / "o"]
    assert_one_line_error(cli(*merge, "--device", "tpu"), "'tpu'")
    assert_one_line_error(cli(*merge, "--device", "cuda:x"), "'cuda:x'")
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    assert_one_line_error(
        cli("eval", family["a"], "--tasks", tmp_path / "t.jsonl", "--device", "tpu"), "'tpu'"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out", ["{file}/sub", "/proc/simmerge-out", "/proc/self/simmerge/out"])
def test_unwritable_output_paths_are_named(
    tmp_path: Path, family: dict[str, Path], cli: Callable[..., tuple[int, str]], out: str
) -> None:
    (tmp_path / "file").write_text("x")
    target = out.format(file=tmp_path / "file")
    merge = ["merge", "--method", "linear", "--models", family["a"], family["b"], "--param", "weight=1"]
    assert_one_line_error(cli(*merge, "--out", target, "--no-progress"), target)


def test_a_full_disk_is_one_line_and_leaves_nothing(
    tmp_path: Path,
    family: dict[str, Path],
    cli: Callable[..., tuple[int, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from simmerge.writer import ShardedSafetensorsWriter

    def full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", full)
    merge = ["merge", "--method", "linear", "--models", family["a"], family["b"], "--param", "weight=1"]
    line = assert_one_line_error(cli(*merge, "--out", tmp_path / "o", "--no-progress"), tmp_path / "o")
    assert "No space left on device" in line
    assert list(tmp_path.iterdir()) == [tmp_path / "home"] or not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.partial*"))


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n', ":2: not UTF-8"),
        (b"\x00\x01\x02\x89PNG\r\n", ":1: not UTF-8"),
        (b'{"prompt": "a", "completion": "b"}\n{oops\n', ":2: not valid JSON"),
        (b"", "has no examples"),
        (b"\n\n", "has no examples"),
        (b'{"prompt": "a"}\n', ":1: field 'completion' is missing"),
        (b'{"completion": "a"}\n', ":1: field 'prompt' is missing"),
        (b'{"prompt": "a", "completion": ""}\n', ":1: field 'completion' is empty"),
        (b"[1, 2]\n", ":1: expected a JSON object"),
    ],
)
def test_bad_task_files_are_refused_naming_file_and_line(
    tmp_path: Path, cli: Callable[..., tuple[int, str]], family: dict[str, Path], content: bytes, needle: str
) -> None:
    task = tmp_path / "task.jsonl"
    task.write_bytes(content)
    assert_one_line_error(cli("catalog", "add-task", task), f"{task}{needle}" if needle[0] == ":" else needle)
    assert_one_line_error(cli("eval", family["a"], "--tasks", task), needle)
    code, _ = cli("catalog", "list")
    assert code == 0


def test_rest_task_upload_names_the_line(client: TestClient) -> None:
    headers = {**auth("writer"), "Content-Type": "application/x-ndjson"}
    for body, needle in [
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "line 2"),
        (b"\x89PNG\r\n\x1a\n\x00", "line 1"),
        (b"", "no examples"),
    ]:
        response = client.post("/v1/tasks", params={"name": "t"}, content=body, headers=headers)
        assert response.status_code == 400 and needle in response.json()["error"]["message"], response.text
    assert client.get("/v1/tasks").json() == []


def test_non_utf8_probes_name_file_and_line(tmp_path: Path) -> None:
    probes = tmp_path / "probes.jsonl"
    probes.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(SimMergeError, match=rf"{probes}:2: not UTF-8"):
        load_probes(probes)


@pytest.mark.parametrize(
    ("catalog", "needle"),
    [
        (b"[]", "holds a JSON list"),
        (b"\xff", "not valid JSON"),
        (b'{"tasks": {"a": 1}}', "'tasks' must be a list"),
        (b'{"tasks": [1]}', "tasks[1] is a JSON int"),
        (b'{"tasks": [{"name": "x"}]}', "tasks[1] needs a string 'file'"),
        (b'{"checkpoints": [{"name": "x", "path": "p", "base": 3}]}', "checkpoints[1] has 'base'"),
        (b'{"checkpoints": [{"name": "x", "path": "p", "tasks": [1]}]}', "checkpoints[1] has 'tasks'"),
    ],
)
def test_wrongly_shaped_catalog_json_is_named(
    tmp_path: Path, cli: Callable[..., tuple[int, str]], catalog: bytes, needle: str
) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "catalog.json").write_bytes(catalog)
    assert_one_line_error(cli("catalog", "import", zoo), zoo / "catalog.json", needle)


def test_wrongly_shaped_catalog_json_is_named_by_the_label_harness(tmp_path: Path) -> None:
    from simmerge.labels.zoo import read_zoo

    (tmp_path / "catalog.json").write_bytes(b"\xff{}")
    with pytest.raises(SimMergeError, match=r"catalog\.json: invalid JSON"):
        read_zoo(tmp_path)


# ---- SIGTERM ---------------------------------------------------------------------------------------
_SLOW_MERGE = """
import sys, time
from pathlib import Path
from simmerge import writer
from simmerge.cli import main

original = writer.ShardedSafetensorsWriter.write

def slow_write(self, name, tensor):
    original(self, name, tensor)
    Path(sys.argv[1]).touch()  # the staging directory holds a partial output now
    time.sleep(0.5)

writer.ShardedSafetensorsWriter.write = slow_write
main(sys.argv[2:])
"""


def test_sigterm_during_a_merge_removes_the_partial_output(tmp_path: Path, family: dict[str, Path]) -> None:
    started = tmp_path / "started"
    out = tmp_path / "out" / "merged"
    argv = ["--home", str(tmp_path / "home"), "merge", "--method", "linear", "--models",
            str(family["a"]), str(family["b"]), "--param", "weight=1", "--out", str(out), "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SLOW_MERGE), str(started), *argv],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the merge never started writing"
            time.sleep(0.05)
        assert list(out.parent.glob(".merged.partial-*"))
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 128 + signal.SIGTERM
    assert not out.exists() and list(out.parent.iterdir()) == []
