"""The shipped predictor on real signatures of the ci zoo (trained on real labels: see docs/models.md)."""

from __future__ import annotations

import json
import shutil

import pytest

from models.api import DEFAULT_PREDICTOR, load_predictor, settings_of
from models.recommend import recommend_plans
from models.sources import FeaturesPackageSource, zoo_paths

pytestmark = pytest.mark.skipif(
    not (DEFAULT_PREDICTOR / "meta.json").exists(), reason="no predictor shipped in models/default"
)

# Merging an expert with an identical copy returns it exactly under these; TIES/DARE trimming and
# task arithmetic with weights that do not sum to one do not.
IDENTITY_PRESERVING = {"linear", "slerp"}


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
    return FeaturesPackageSource(home, paths), expert


def test_shipped_predictor_matches_the_features_package(twin_source):
    source, _ = twin_source
    _, meta = load_predictor(DEFAULT_PREDICTOR)
    assert meta["pair_feature_names"] == source.feature_names
    assert meta["feature_schema_version"] == source.schema_version


def test_identical_checkpoints_get_identity_preserving_merges_on_top(twin_source):
    source, expert = twin_source
    predictor, meta = load_predictor(DEFAULT_PREDICTOR)
    out = recommend_plans(
        [expert, f"{expert}-copy"],
        predictor,
        source,
        meta["input_feature_names"],
        top=3,
        base="a-base",
        settings=settings_of(meta),
    )
    top = out["plans"][0]
    assert top["steps"][0]["method"] in IDENTITY_PRESERVING, json.dumps(out["plans"], indent=1)[:2000]
