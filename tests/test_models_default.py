"""The shipped predictor on real signatures of the ci zoo (trained on real labels: see docs/models.md)."""

from __future__ import annotations

import json
import shutil

import pytest

from models.api import DEFAULT_PREDICTOR, load_predictor
from models.plans import PlanQuery
from models.selection import Selection
from models.sources import FeaturesPackageSource, zoo_paths

pytestmark = pytest.mark.skipif(
    not (DEFAULT_PREDICTOR / "meta.json").exists(), reason="no predictor shipped in models/default"
)


@pytest.fixture(scope="module")
def twin_source(ci_zoo, tmp_path_factory):
    """Signatures of a zoo expert and of a byte-identical copy of it (a second catalog name)."""
    from simmerge.catalog import Catalog

    root = tmp_path_factory.mktemp("twins")
    home = root / "home"
    paths = zoo_paths(ci_zoo)
    expert = next(n for n in paths if n.startswith("a-reverse"))
    copy = shutil.copytree(paths[expert], root / f"{expert}-copy")
    with Catalog.open(home) as catalog:  # registered as a user would: same base as the original
        catalog.import_zoo(ci_zoo)
        catalog.add(copy, name=f"{expert}-copy", base="a-base", tasks=["reverse"])
    paths[f"{expert}-copy"] = copy
    return FeaturesPackageSource(home, paths), expert, paths


def test_shipped_predictor_matches_the_features_package(twin_source):
    source, _, _ = twin_source
    _, meta = load_predictor(DEFAULT_PREDICTOR)
    assert meta["pair_feature_names"] == source.feature_names
    assert meta["feature_schema_version"] == source.schema_version


def test_identical_checkpoints_get_identity_preserving_merges_on_top(twin_source):
    """The top plan for an expert and its copy returns the expert: run through the engine, not trusted by name.

    Averaging merges (linear, task_arithmetic weight 0.5 each, slerp) preserve it exactly; TIES/DARE
    trimming and task-vector sums that do not add up to one do not.
    """
    from simmerge.checkpoint import Checkpoint
    from simmerge.engine import merge_state_dict
    from simmerge.plan import Plan

    source, expert, paths = twin_source
    predictor, meta = load_predictor(DEFAULT_PREDICTOR)
    out = Selection(predictor, meta, source).recommend_many(
        [PlanQuery((expert, f"{expert}-copy"), "a-base")], [3]
    )
    top = out[0]["plans"][0]
    merged = merge_state_dict(Plan.from_yaml(top["mergekit_yaml"]), resolve=lambda name: str(paths[name]))
    original = Checkpoint.open(paths[expert])
    for name, tensor in merged.items():
        difference = float((tensor - original.read(name).float()).abs().max())
        assert difference < 1e-5, f"{name} differs by {difference}: {json.dumps(top, indent=1)[:1500]}"
