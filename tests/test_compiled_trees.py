"""Compiled LightGBM trees: predictions and TreeSHAP contributions equal LightGBM's, bit for bit."""

from __future__ import annotations

import itertools
import math

import lightgbm as lgb
import numpy as np
import pytest

import models.compiled_trees as compiled_trees
from models.compiled_trees import ZERO_THRESHOLD, CompiledEnsemble, _goes_right, _sends_right
from models.predictor import LightGBMSelector
from simmerge.errors import SimMergeError

N_FEATURES = 6
PARAMS = {"verbose": -1, "num_leaves": 15, "min_data_in_leaf": 5, "num_threads": 1, "deterministic": True}


def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random rows with NaNs (but in the last column), exact zeros, and values LightGBM's reader rounds to 0
    (|x| <= kZeroThreshold)."""
    X = rng.normal(size=(n, N_FEATURES))
    X[:, :-1][rng.random((n, N_FEATURES - 1)) < 0.12] = np.nan
    X[rng.random(X.shape) < 0.12] = 0.0
    X[rng.random(X.shape) < 0.03] = -0.0
    tiny = rng.random(X.shape) < 0.03
    X[tiny] = rng.choice([1e-36, -1e-36, ZERO_THRESHOLD, -ZERO_THRESHOLD, 2e-35, -2e-35], size=tiny.sum())
    return X


def _target(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    filled = np.nan_to_num(X)
    return (
        2 * filled[:, 0]
        + filled[:, 1] ** 2
        - 3 * (X[:, 2] == 0)
        + np.isnan(X[:, 3])
        + np.abs(X[:, 5])
        + rng.normal(size=len(X)) * 0.1
    )


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = _rows(rng, 500)
    return X, _target(X, rng), _rows(rng, 300)


def _train(X: np.ndarray, y: np.ndarray, rounds: int = 30, **params) -> lgb.Booster:
    return lgb.train({**PARAMS, **params}, lgb.Dataset(X, y), num_boost_round=rounds)


def _missing_types(booster: lgb.Booster) -> set[str]:
    def walk(node):
        if "leaf_value" in node:
            return set()
        return {node["missing_type"]} | walk(node["left_child"]) | walk(node["right_child"])

    return set().union(*(walk(tree["tree_structure"]) for tree in booster.dump_model()["tree_info"]))


MODELS = {
    "regression": ({}, {"None", "NaN"}),
    "quantile": ({"objective": "quantile", "alpha": 0.2}, {"None", "NaN"}),
    "no missing values": ({"use_missing": False}, {"None"}),
    "zero as missing": ({"zero_as_missing": True}, {"Zero"}),
    "huber": ({"objective": "huber"}, {"None", "NaN"}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_predictions_and_contributions_equal_lightgbms(data, name):
    X, y, rows = data
    params, missing_types = MODELS[name]
    booster = _train(X, y, **params)
    assert _missing_types(booster) == missing_types  # the model exercises the decision rule it is meant to
    trees = CompiledEnsemble.from_booster(booster)
    assert trees is not None and trees.n_features == N_FEATURES
    if name == "zero as missing":
        assert trees.zero_default.any()  # 0 takes the default side against the comparison somewhere
    else:
        assert trees.nan_right.any() and not trees.nan_right.all()
    for n in (1, 3, len(rows)):  # a few rows are walked down the trees, more are tested split by split
        np.testing.assert_array_equal(trees.predict(rows[:n]), booster.predict(rows[:n]))
    np.testing.assert_array_equal(trees.contributions(rows), booster.predict(rows, pred_contrib=True))


def test_contributions_replayed_per_row_equal_lightgbms(data, monkeypatch):
    X, y, rows = data
    booster = _train(X, y)
    monkeypatch.setattr(compiled_trees, "MAX_TABLE_ENTRIES", 64)  # most leaves cannot be tabulated
    trees = CompiledEnsemble.from_booster(booster)
    table_start, _ = trees.shap_tables
    assert (table_start == compiled_trees.NOT_TABULATED).mean() > 0.5
    np.testing.assert_array_equal(trees.contributions(rows), booster.predict(rows, pred_contrib=True))


def test_a_single_leaf_model(data):
    X, _, rows = data
    booster = _train(X, np.full(len(X), 0.25), rounds=3)
    assert booster.dump_model()["tree_info"][0]["num_leaves"] == 1
    trees = CompiledEnsemble.from_booster(booster)
    assert trees is not None
    for n in (1, len(rows)):
        np.testing.assert_array_equal(trees.predict(rows[:n]), booster.predict(rows[:n]))
    contrib = trees.contributions(rows)
    np.testing.assert_array_equal(contrib, booster.predict(rows, pred_contrib=True))
    assert (contrib[:, :-1] == 0).all() and (contrib[:, -1] != 0).all()


@pytest.mark.parametrize(
    "params",
    [
        {"objective": "poisson"},
        {"objective": "regression", "reg_sqrt": True},
        {"objective": "multiclass", "num_class": 3},
        {"boosting": "rf", "bagging_fraction": 0.5, "bagging_freq": 1},
        {"linear_tree": True},
    ],
    ids=["transformed output", "reg_sqrt", "multiclass", "random forest", "linear trees"],
)
def test_models_it_does_not_cover_are_left_to_lightgbm(data, params):
    X, y, _ = data
    y = np.abs(np.round(y)) % 3 if params.get("objective") in ("poisson", "multiclass") else y
    X = np.nan_to_num(X) if params.get("linear_tree") else X
    assert CompiledEnsemble.from_booster(_train(X, y, rounds=3, **params)) is None


def _categorical_boosters(X: np.ndarray, y: np.ndarray) -> dict[str, lgb.Booster]:
    X = X.copy()
    X[:, 0] = np.abs(np.nan_to_num(np.round(X[:, 0] * 2)))
    data = lgb.Dataset(X, y, categorical_feature=[0], params={"verbose": -1})
    quantile = {"objective": "quantile", "alpha": 0.1}
    return {
        "mean": lgb.train(PARAMS, data, 20),
        "q10": lgb.train({**PARAMS, **quantile}, data, 5),
        "q90": lgb.train({**PARAMS, **quantile, "alpha": 0.9}, data, 5),
    }


def test_a_categorical_model_is_left_to_lightgbm(data, tmp_path):
    X, y, rows = data
    boosters = _categorical_boosters(X, y)
    assert CompiledEnsemble.from_booster(boosters["mean"]) is None
    names = [f"f{i}" for i in range(N_FEATURES)]
    LightGBMSelector(feature_names=names, boosters=boosters).save(tmp_path)
    selector = LightGBMSelector.load(tmp_path)
    mean, uncertainty = selector.predict(rows)
    loaded = selector.boosters
    np.testing.assert_array_equal(mean, loaded["mean"].predict(rows))
    np.testing.assert_array_equal(
        uncertainty, np.abs(loaded["q90"].predict(rows) - loaded["q10"].predict(rows)) / 2
    )
    np.testing.assert_array_equal(
        selector.contributions(rows), loaded["mean"].predict(rows, pred_contrib=True)[:, :-1]
    )


@pytest.fixture(scope="module")
def selector(data) -> LightGBMSelector:
    X, y, _ = data
    return LightGBMSelector(seed=0, rounds=40).fit(X, y, [f"f{i}" for i in range(N_FEATURES)])


def _lightgbm_answers(selector: LightGBMSelector, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    boosters = selector.boosters
    mean, lo, hi = (boosters[key].predict(rows) for key in ("mean", "q10", "q90"))
    return mean, np.abs(hi - lo) / 2.0, boosters["mean"].predict(rows, pred_contrib=True)[:, :-1]


def test_selector_answers_without_lightgbm_and_as_lightgbm(data, selector, monkeypatch):
    rows = data[2]
    expected = _lightgbm_answers(selector, rows)

    def no_lightgbm(*args, **kwargs):
        raise AssertionError("LightGBM's predict was called")

    monkeypatch.setattr(lgb.Booster, "predict", no_lightgbm)
    for n in (1, len(rows)):
        mean, uncertainty = selector.predict(rows[:n])
        np.testing.assert_array_equal(mean, expected[0][:n])
        np.testing.assert_array_equal(uncertainty, expected[1][:n])
    np.testing.assert_array_equal(selector.contributions(rows), expected[2])
    with pytest.raises(SimMergeError, match="columns"):  # the width is still checked first
        selector.predict(rows[:, :-1])
    with pytest.raises(SimMergeError, match="columns"):
        selector.contributions(rows[:, :-1])


def test_saved_selector_reloads_to_the_same_answers(data, selector, tmp_path):
    rows = data[2]
    selector.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mean.txt", "meta.json", "q10.txt", "q90.txt"]
    loaded = LightGBMSelector.load(tmp_path)
    for got, want in zip(loaded.predict(rows), selector.predict(rows), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loaded.contributions(rows), selector.contributions(rows))


def test_a_replaced_booster_is_not_answered_by_the_old_trees(data, selector):
    X, y, rows = data
    replaced = LightGBMSelector(seed=0, rounds=40).fit(X, y, selector.feature_names)
    replaced.boosters["mean"] = _train(X, -y)
    np.testing.assert_array_equal(replaced.predict(rows)[0], replaced.boosters["mean"].predict(rows))


def _lightgbm_goes_right(x: float, missing_type: str, default_left: bool, threshold: float) -> bool:
    """LightGBM's dense-row reader, then `Tree::NumericalDecision`, transcribed."""
    fval = x if math.isnan(x) or abs(x) > ZERO_THRESHOLD else 0.0
    if math.isnan(fval) and missing_type != "NaN":
        fval = 0.0
    if (missing_type == "Zero" and -ZERO_THRESHOLD <= fval <= ZERO_THRESHOLD) or (
        missing_type == "NaN" and math.isnan(fval)
    ):
        return not default_left
    return not fval <= threshold


def test_decision_rule_is_lightgbms_for_every_missing_type():
    values = [
        math.nan,
        0.0,
        -0.0,
        1e-36,
        -1e-36,
        ZERO_THRESHOLD,
        -ZERO_THRESHOLD,
        2e-35,
        -2e-35,
        0.5,
        -0.5,
        math.inf,
    ]
    thresholds = [-1.0, -ZERO_THRESHOLD, 0.0, ZERO_THRESHOLD, 1e-36, 0.25]
    for missing_type, default_left, threshold in itertools.product(
        ("None", "Zero", "NaN"), (True, False), thresholds
    ):
        nan_right, zero_right = _sends_right(missing_type, default_left, threshold)
        zero_default = zero_right != (threshold < 0.0)
        for x in values:
            read = 0.0 if abs(x) <= ZERO_THRESHOLD else x  # as `_lightgbm_columns`
            want = _lightgbm_goes_right(x, missing_type, default_left, threshold)
            assert _goes_right(read, threshold, nan_right, zero_right) == want, (
                missing_type,
                default_left,
                x,
            )
            if not zero_default:  # the one-comparison forms the split-by-split loop uses
                assert (not read <= threshold if nan_right else read > threshold) == want


def test_wrong_width_is_refused(data):
    X, y, rows = data
    trees = CompiledEnsemble.from_booster(_train(X, y, rounds=2))
    with pytest.raises(ValueError, match="columns"):
        trees.predict(rows[:, :-1])
    with pytest.raises(ValueError, match="columns"):
        trees.contributions(rows[0])
