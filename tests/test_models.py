"""Learned selection: descriptors, training determinism, persistence, metrics, plan search, scoring."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch

from models.baselines import BestFixedSelector, LassoSelector, RandomSelector
from models.dataset import build_dataset, label_candidate, load_labels
from models.evaluate import held_out_catalog, held_out_pairs, leave_one_task_out, markdown_table
from models.metrics import evaluate_selection, ndcg_at_k
from models.plans import DEFAULT_SETTINGS, Candidate, OperatorSetting, PlanQuery, fold_weights, search
from models.predictor import LightGBMSelector, load_selector
from models.score_catalog import best_per_pair, plot_best_merges, write_table
from models.selection import Selection
from models.synthetic import SyntheticCatalog, make_catalog, make_labels
from models.table import PlanTable, aggregate_pair_rows, descriptor_names, pair_feature_names
from simmerge.errors import PlanError, SimMergeError
from simmerge.plan import Plan


@pytest.fixture(scope="module")
def catalog() -> SyntheticCatalog:
    return make_catalog(n_tasks=3, per_task=3, seed=0)


@pytest.fixture(scope="module")
def data(catalog):
    return build_dataset(make_labels(catalog, seed=0, triples=6), catalog)


@pytest.fixture(scope="module")
def predictor(data) -> LightGBMSelector:
    return LightGBMSelector(seed=0, rounds=60).fit(data.X, data.y, data.feature_names)


# -- descriptors and dataset --------------------------------------------------------------------------
def _describe(method: str, params: dict, catalog, columns=None) -> dict[str, float]:
    table = PlanTable(catalog, columns)
    candidate = Candidate(tuple(catalog.names[:2]), (OperatorSetting(method, params),))
    return dict(zip(table.columns, table.descriptor(candidate), strict=False))


def test_descriptor_fills_defaults_and_separates_families(catalog):
    ties = _describe("ties", {"density": 0.3}, catalog)
    linear = _describe("linear", {}, catalog)
    assert ties["op:family=ties"] == 1 and ties["op:sign_election"] == 1 and ties["op:param=density"] == 0.3
    assert ties["op:param=lambda"] == 1.0  # omitted parameter gets its default
    assert linear["op:family=linear"] == 1 and linear["op:uses_base"] == 0


def test_descriptor_rejects_non_numeric_parameter(catalog):
    with pytest.raises(PlanError, match="density"):
        _describe("ties", {"density": "half"}, catalog)


def test_fold_weights_give_last_model_half():
    assert fold_weights(3).tolist() == [0.25, 0.25, 0.5]
    assert fold_weights(2).tolist() == [0.5, 0.5]


def test_dataset_rows_pools_and_kinds(catalog, data):
    n_pairs = len(list(combinations(catalog.names, 2)))
    assert (data.kinds == "pair").sum() == n_pairs * len(DEFAULT_SETTINGS)
    assert data.X.shape == (len(data.y), len(data.feature_names))
    # every row of a pool merges the same checkpoints
    for pool, members in zip(data.pools, data.models, strict=True):
        assert pool == "|".join(sorted(members))
    # a pair's mean, min and max features coincide; a triple's differ
    first = data.feature_names.index("pair:mean:cosine")
    low, high = data.feature_names.index("pair:min:cosine"), data.feature_names.index("pair:max:cosine")
    pair_row = np.flatnonzero(data.kinds == "pair")[0]
    kway_row = np.flatnonzero(data.kinds == "kway")[0]
    assert data.X[pair_row, first] == data.X[pair_row, low] == data.X[pair_row, high]
    assert data.X[kway_row, low] < data.X[kway_row, high]


def test_tasks_per_checkpoint_are_recovered_from_labels(catalog):
    from models.dataset import model_tasks_from_labels

    assert model_tasks_from_labels(make_labels(catalog, seed=0)) == catalog.tasks


def test_load_labels_names_missing_column(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"method": ["linear"], "models": ['["a", "b"]']}).to_csv(path, index=False)
    with pytest.raises(SimMergeError, match="held_in_score"):
        load_labels(path)


def test_labels_round_trip_through_parquet(tmp_path, catalog):
    path = tmp_path / "labels.parquet"
    make_labels(catalog, seed=1).to_parquet(path)
    frame = load_labels(path)
    assert isinstance(frame.loc[0, "models"], list) and len(frame.loc[0, "models"]) == 2
    assert len(build_dataset(frame, catalog)) == len(frame)


# -- predictor --------------------------------------------------------------------------------------
def test_training_is_deterministic_for_a_seed(data):
    a = LightGBMSelector(seed=3, rounds=40).fit(data.X, data.y, data.feature_names).predict(data.X)
    b = LightGBMSelector(seed=3, rounds=40).fit(data.X, data.y, data.feature_names).predict(data.X)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_saved_predictor_reloads_to_identical_predictions(tmp_path, data, predictor):
    predictor.save(tmp_path / "p", meta={"target": "held_in"})
    reloaded = load_selector(tmp_path / "p")
    for before, after in zip(predictor.predict(data.X), reloaded.predict(data.X), strict=True):
        np.testing.assert_array_equal(before, after)
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["target"] == "held_in"
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.joblib"))


def test_predictor_beats_best_fixed_on_a_held_out_catalog(data, predictor):
    other = make_catalog(n_tasks=3, per_task=3, seed=7, task_offset=10)
    test = build_dataset(make_labels(other, seed=7), other)
    fixed = BestFixedSelector().fit(data.X, data.y, data.feature_names).predict(test.X)[0]
    report = evaluate_selection(test.pools, test.y, predictor.predict(test.X)[0], fixed)
    assert report.mean_selected > report.mean_best_fixed
    assert report.spearman_pooled > 0.8
    assert np.all(predictor.predict(test.X)[1] >= 0)


def test_predictor_rejects_wrong_width(predictor):
    with pytest.raises(SimMergeError, match="columns"):
        predictor.predict(np.zeros((2, 3)))


def test_lasso_and_best_fixed_persist_as_json(tmp_path, data):
    lasso = LassoSelector(seed=0).fit(data.X, data.y, data.feature_names)
    fixed = BestFixedSelector().fit(data.X, data.y, data.feature_names)
    for selector, name in ((lasso, "lasso"), (fixed, "fixed")):
        selector.save(tmp_path / name)
        np.testing.assert_allclose(
            load_selector(tmp_path / name).predict(data.X)[0], selector.predict(data.X)[0]
        )
    assert lasso.top_coefficients(3)


def test_best_fixed_ranks_every_pool_by_its_best_training_setting(data):
    fixed = BestFixedSelector().fit(data.X, data.y, data.feature_names)
    pair = data.kinds == "pair"
    by_setting = pd.Series(data.y[pair]).groupby(data.settings[pair]).mean()
    top_setting = by_setting.idxmax()
    pred = fixed.predict(data.X[pair])[0]
    assert set(data.settings[pair][pred == pred.max()]) == {top_setting}


def test_random_selector_is_seeded(data):
    assert np.array_equal(RandomSelector(5).predict(data.X)[0], RandomSelector(5).predict(data.X)[0])
    assert not np.array_equal(RandomSelector(5).predict(data.X)[0], RandomSelector(6).predict(data.X)[0])


# -- metrics on hand-made pools ------------------------------------------------------------------------
def test_metrics_on_hand_made_pools():
    # pool P: scores 0.9 (oracle), 0.5, 0.7; pool Q: 0.6, 0.8 (oracle)
    pools = np.array(["P", "P", "P", "Q", "Q"])
    measured = np.array([0.9, 0.5, 0.7, 0.6, 0.8])
    predicted = np.array([0.1, 0.3, 0.2, 0.0, 1.0])  # picks 0.5 in P, 0.8 in Q
    fixed = np.array([0.0, 0.0, 1.0, 1.0, 0.0])  # best fixed picks 0.7 in P, 0.6 in Q
    r = evaluate_selection(pools, measured, predicted, fixed)
    assert r.mean_oracle == pytest.approx((0.9 + 0.8) / 2)
    assert r.mean_selected == pytest.approx((0.5 + 0.8) / 2)
    assert r.mean_best_fixed == pytest.approx((0.7 + 0.6) / 2)
    assert r.mean_regret == pytest.approx((0.4 + 0.0) / 2)
    # (0.65 - 0.65) / (0.85 - 0.65) = 0
    assert r.gap_closed == pytest.approx(0.0)
    assert r.top1_accuracy == pytest.approx(0.5)
    # pool P ranks exactly backwards → Spearman −1; pool Q has 2 plans → undefined, skipped
    assert r.spearman_per_pool == pytest.approx(-1.0)
    oracle = evaluate_selection(pools, measured, measured, fixed)
    assert oracle.gap_closed == pytest.approx(1.0) and oracle.top1_accuracy == 1.0


def test_ndcg_by_hand():
    measured = np.array([0.9, 0.5, 0.7])  # gains 0.4, 0.0, 0.2
    ideal = 0.4 / np.log2(2) + 0.2 / np.log2(3)
    assert ndcg_at_k(measured, np.array([3.0, 2.0, 1.0])) == pytest.approx((0.4 + 0.0 + 0.2 / 2) / ideal)
    assert ndcg_at_k(measured, measured) == pytest.approx(1.0)
    assert ndcg_at_k(np.array([0.5, 0.5]), np.array([0.0, 1.0])) == 1.0


def test_evaluation_protocols_produce_every_selector(data, catalog):
    pairs = held_out_pairs(data, folds=3, names=("lightgbm", "best_fixed", "random"))
    tasks = leave_one_task_out(data, catalog.tasks, names=("lightgbm", "best_fixed"))
    reports = {"held-out pairs": pairs.reports(), "leave-one-task-out": tasks.reports()}
    assert set(reports["held-out pairs"]) == {"lightgbm", "best_fixed", "random", "oracle"}
    assert reports["held-out pairs"]["oracle"].mean_regret == 0
    assert reports["held-out pairs"]["best_fixed"].gap_closed == pytest.approx(0.0)
    table = markdown_table(reports)
    assert "| leave-one-task-out | lightgbm |" in table
    with pytest.raises(SimMergeError, match="no task is known"):
        leave_one_task_out(data, {}, names=("best_fixed",))


def _with_self_rows(catalog) -> pd.DataFrame:
    """Synthetic labels plus each checkpoint merged with itself (kind `self`) under the non-slerp settings."""
    labels = make_labels(catalog, seed=0)
    settings = [s for s in DEFAULT_SETTINGS if s.method != "slerp"]
    rows = [
        {
            **labels.iloc[0].to_dict(),
            "plan_id": f"self-{name}-{s.key}",
            "plan_json": json.dumps(
                Plan.single(s.method, [name, name], base="base", parameters=dict(s.params)).to_dict()
            ),
            "kind": "self",
            "method": s.method,
            "params_json": json.dumps(dict(s.params), sort_keys=True),
            "models": [name, name],
            "held_in_tasks": catalog.tasks[name],
            "held_in_score": 1.0 if s.method == "linear" else 0.5,
        }
        for name in catalog.names
        for s in settings
    ]
    return pd.concat([labels, pd.DataFrame(rows)], ignore_index=True)


def test_self_rows_train_but_are_never_evaluated(catalog):
    data = build_dataset(_with_self_rows(catalog), catalog)
    own = data.subset(data.kinds == "self")
    assert len(own) == len(catalog.names) * sum(s.method != "slerp" for s in DEFAULT_SETTINGS)
    assert set(own.pools) == {f"{n}|{n}" for n in catalog.names}
    # a checkpoint with itself has the features of the pair (a, a): cosine 1, distance 0
    assert np.allclose(own.X[:, data.feature_names.index("pair:mean:cosine")], 1.0)
    evaluable = int(data.evaluable.sum())
    for predictions in (
        held_out_pairs(data, folds=3, names=("lightgbm", "best_fixed")),
        leave_one_task_out(data, catalog.tasks, names=("best_fixed",)),
        held_out_catalog(data, data, names=("best_fixed",)),
    ):
        assert not any(pool.split("/", 1)[1] in set(own.pools) for pool in predictions.pools)
    assert len(held_out_pairs(data, folds=3, names=("best_fixed",)).measured) == evaluable
    # best fixed ignores self rows: linear's perfect self scores must not make it the fixed choice
    plain = build_dataset(make_labels(catalog, seed=0), catalog)
    pairs = held_out_pairs(data, folds=3, names=("best_fixed",))
    pairs_plain = held_out_pairs(plain, folds=3, names=("best_fixed",))
    assert np.array_equal(pairs.predicted["best_fixed"], pairs_plain.predicted["best_fixed"])


def test_held_out_catalog_requires_same_columns(data):
    other = data.subset(np.ones(len(data), bool))
    other.feature_names = [*data.feature_names[:-1], "something-else"]
    with pytest.raises(SimMergeError, match="different columns"):
        held_out_catalog(data, other)


# -- the plan table, plan search, recommendation, catalog scoring ------------------------------------
def _selection(predictor, source, data, settings=DEFAULT_SETTINGS, feedback=None, arms=None) -> Selection:
    columns = [c for c in data.feature_names if c.startswith("op:")] + pair_feature_names(
        source.feature_names
    )
    meta = {"input_feature_names": columns, "settings": [s.to_dict() for s in settings]}
    return Selection(predictor, meta, source, feedback, arms)


def _reference_row(candidate: Candidate, source, columns: list[str]) -> np.ndarray:
    """A plan's row written out plainly, column by column (pins `PlanTable.rows`)."""
    from simmerge.operators import get_operator

    def step_value(setting: OperatorSetting, column: str, flip: bool) -> float:
        op = get_operator(setting.method)
        name = column[3:]
        if name.startswith("family="):
            families = [c[len("op:family=") :] for c in columns if c.startswith("op:family=")]
            family = name[len("family=") :]
            return float(family == setting.method or (family == "other" and setting.method not in families))
        if name.startswith("param="):
            param = name[len("param=") :]
            defaults = {p.name: p.default for p in (*op.method_params, *op.model_params) if not p.required}
            fallback = {"weight": 1, "density": 1, "lambda": 1, "t": 0.5}.get(param, 0.0)
            value = float(setting.params.get(param, defaults.get(param, fallback)))
            return round(1 - value, 9) if flip and param == "t" else value
        return float(op.traits()[name])

    n, models = len(candidate.settings), candidate.models
    flip = n == 1 and len(models) == 2 and models[0] > models[1] and candidate.settings[0].method == "slerp"
    row = []
    for column in columns:
        if column.startswith("op:kind="):
            row.append(float(column == f"op:kind={candidate.kind}"))
        elif column == "op:n_models":
            row.append(float(len(models)))
        elif column == "op:n_steps":
            row.append(float(n))
        elif column.startswith("op:"):
            values = [step_value(s, column, flip) for s in candidate.settings]
            row.append(float(np.average(values, weights=2.0 ** np.arange(n))))
    unique = sorted(set(models))
    pairs = [(a, b) for i, a in enumerate(unique) for b in unique[i + 1 :]] or [(unique[0], unique[0])]
    rows = np.asarray(source.pair_features(pairs))
    weights = None
    if candidate.kind == "fold":
        share = dict(zip(models, fold_weights(len(models)), strict=True))
        weights = [share[a] * share[b] for a, b in pairs]
    pair_part = np.concatenate([np.average(rows, axis=0, weights=weights), rows.min(0), rows.max(0)])
    return np.concatenate([row, pair_part])


def test_plan_table_rows_equal_the_plain_reference(catalog, data):
    names = catalog.names
    settings = list(DEFAULT_SETTINGS)
    candidates = [Candidate((names[1], names[0]), (s,)) for s in settings]  # reversed: slerp flips
    candidates += [Candidate(tuple(names[:4]), (s,)) for s in settings if s.takes(4)]
    candidates += [
        Candidate(tuple(names[2:5]), (settings[i], settings[j])) for i, j in ((0, 4), (4, 1), (8, 2))
    ]
    candidates += [Candidate((names[3], names[3]), (settings[4],))]  # a checkpoint with itself
    table = PlanTable(catalog, data.feature_names)
    rows = table.rows(candidates)
    for candidate, row in zip(candidates, rows, strict=True):
        assert np.allclose(
            row, _reference_row(candidate, catalog, data.feature_names), rtol=1e-12, atol=1e-12
        )


def test_plan_search_covers_subsets_orders_and_kway(catalog, predictor, data):
    models = catalog.names[:4]
    table = PlanTable(catalog, data.feature_names)
    score = lambda cands: table.score(predictor, cands)  # noqa: E731
    scored = search([PlanQuery(tuple(models), "base", 3)], score, DEFAULT_SETTINGS, beam_width=3)[0]
    kinds = {s.candidate.kind for s in scored}
    assert kinds == {"pair", "fold", "kway"}
    assert max(len(s.candidate.models) for s in scored) == 3
    assert [s.predicted for s in scored] == sorted((s.predicted for s in scored), reverse=True)
    folds = [s for s in scored if s.candidate.kind == "fold"]
    assert folds and all(len(s.candidate.models) == 3 for s in folds)
    # the order of a fold changes its features (the last model holds half of the result)
    first = folds[0].candidate
    swapped = Candidate((first.models[2], first.models[1], first.models[0]), first.settings)
    rows = table.rows([first, swapped])
    assert not np.array_equal(rows[0], rows[1])
    with pytest.raises(PlanError, match="at least two"):
        search([PlanQuery(tuple(models[:1]))], score, DEFAULT_SETTINGS)


def test_plan_search_without_base_uses_base_free_operators(catalog, predictor, data):
    table = PlanTable(catalog, data.feature_names)
    scored = search(
        [PlanQuery(tuple(catalog.names[:3]))], lambda c: table.score(predictor, c), DEFAULT_SETTINGS
    )
    assert {s.method for c in scored[0] for s in c.candidate.settings} <= {"linear", "slerp"}


def test_recommendations_for_identical_checkpoints_rank_identity_preserving_merges_top(predictor, data):
    twin = make_catalog(n_tasks=2, per_task=2, seed=11)
    name = twin.names[0]
    twin.names.append(f"{name}-copy")
    twin.vectors[f"{name}-copy"] = twin.vectors[name].copy()
    selection = _selection(predictor, _IdentityColumns(twin), data)
    out = selection.recommend_many([PlanQuery((name, f"{name}-copy"), "base")], [3])[0]
    top = out["plans"][0]
    assert top["steps"][0]["method"] in {"linear", "slerp", "task_arithmetic"}  # these return the copy
    assert top["rank"] == 1 and len(top["drivers"]) == 3 and out["ranked_by"] == "regressor"
    plan = Plan.from_yaml(top["mergekit_yaml"])
    assert {name, f"{name}-copy"} <= set(plan.checkpoints())
    with pytest.raises(SimMergeError, match="top=0"):
        selection.recommend_many([PlanQuery((name, f"{name}-copy"), "base")], [0])


def test_recommend_returns_runnable_yaml_for_folds(catalog, predictor, data):
    out = _selection(predictor, catalog, data).recommend_many(
        [PlanQuery(tuple(catalog.names[:3]), "base")], [40]
    )
    plans = out[0]["plans"]
    fold = next(p for p in plans if p["kind"] == "fold")
    plan = Plan.from_yaml(fold["mergekit_yaml"])
    assert len(plan.steps) == 2 and plan.steps[1].models[0].model == "step1"
    assert [p["rank"] for p in plans] == list(range(1, len(plans) + 1))


@pytest.mark.parametrize("order", [0, 1, 2])
def test_one_plan_one_prediction_from_table_recommend_and_score_catalog(catalog, predictor, data, order):
    """Whatever order the checkpoints come in, a plan of every kind gets the plan table's prediction from
    `recommend` and (for pairs) from `score-catalog`."""
    names = catalog.names[:4]
    shuffled = [names[i] for i in np.random.default_rng(order).permutation(len(names))]
    selection = _selection(predictor, catalog, data)
    plans = selection.recommend_many([PlanQuery(tuple(shuffled), "base")], [500])[0]["plans"]
    assert {p["kind"] for p in plans} == {"pair", "fold", "kway"}
    table = PlanTable(catalog, data.feature_names)
    from models.selection import feedback_candidate

    direct = table.score(predictor, [feedback_candidate(p) for p in plans])[1]
    assert np.array_equal(direct, [p["predicted_score"] for p in plans])
    scores = selection.score_pairs(list(reversed(shuffled)))
    for p in (p for p in plans if p["kind"] == "pair"):
        step = p["steps"][0]
        row = scores[
            (scores["model_a"] == min(p["models"]))
            & (scores["model_b"] == max(p["models"]))
            & (scores["method"] == step["method"])
            & (scores["parameters"] == json.dumps(step["parameters"], sort_keys=True))
        ]
        if step["method"] == "slerp" and p["models"][0] > p["models"][1]:
            continue  # slerp from the later name is another plan than score-catalog's (from the earlier)
        assert row["predicted_score"].tolist() == [p["predicted_score"]]


class _IdentityColumns:
    """A synthetic catalog whose first two columns carry the identity features' names (zero for copies)."""

    def __init__(self, catalog: SyntheticCatalog) -> None:
        self.catalog = catalog
        self.feature_names = ["tv_dist", "js_mean", *catalog.feature_names[2:]]

    def pair_features(self, pairs):
        rows = self.catalog.pair_features(pairs)
        return np.column_stack([rows[:, 1], rows[:, 3], rows[:, 2:]])  # distance, |norm difference|


def test_an_operator_registered_in_one_place_is_described_and_recommended(
    catalog, predictor, data, monkeypatch
):
    """A new family: one class and one registry entry; the table describes it by its traits (as
    `other`), and recommendations offer it at its defaults."""
    from simmerge import operators
    from simmerge.operators.base import MergeOperator, Param

    class Midpoint(MergeOperator):
        name = "midpoint_test"
        method_params = (Param("lambda", float, 0.7),)
        model_params = (Param("weight", float),)
        needs_base = True
        magnitude_trim = True

    monkeypatch.setitem(operators._NATIVE, "midpoint_test", Midpoint())
    assert "op:family=midpoint_test" in descriptor_names()  # a predictor trained now gets its column
    described = _describe("midpoint_test", {}, catalog, data.feature_names)  # one trained before: other
    assert described["op:family=other"] == 1 and described["op:magnitude_trim"] == 1
    assert described["op:param=lambda"] == 0.7 and described["op:uses_base"] == 1
    out = _selection(predictor, catalog, data).recommend_many(
        [PlanQuery(tuple(catalog.names[:2]), "base")], [500]
    )
    offered = {p["steps"][-1]["method"] for p in out[0]["plans"]}
    assert "midpoint_test" in offered
    assert "midpoint_test" in set(
        _selection(predictor, catalog, data).score_pairs(catalog.names[:3])["method"]
    )


class _Feedback:
    def __init__(self) -> None:
        self.rows: list = []

    def feedback_since(self, after_id):
        return [r for r in self.rows if r.id > after_id]


def test_feedback_that_makes_plan_two_better_puts_it_first(catalog, predictor, data):
    from models.ports import FeedbackRecord

    log = _Feedback()
    selection = _selection(predictor, catalog, data, feedback=log)
    query = [PlanQuery(tuple(catalog.names[:3]), "base")]
    first = selection.recommend_many(query, [3])[0]
    one, two = first["plans"][0], first["plans"][1]
    for i in range(4):
        log.rows.append(FeedbackRecord(2 * i + 1, one["plan"], "t", one["predicted_score"] - 0.3))
        log.rows.append(FeedbackRecord(2 * i + 2, two["plan"], "t", two["predicted_score"] + 0.3))
    after = selection.recommend_many(query, [3])[0]
    assert after["ranked_by"] == "bandit (exploit)"
    assert after["plans"][0]["description"] == two["description"]
    assert (
        "bandit_score" in after["plans"][0] and after["plans"][0]["predicted_score"] == two["predicted_score"]
    )
    explore = selection.recommend_many(query, [3], mode="explore")[0]
    assert explore["ranked_by"] == "bandit (explore)" and "bandit_width" in explore["plans"][0]
    with pytest.raises(SimMergeError, match="mode"):
        selection.recommend_many(query, [3], mode="greedy")


def test_score_catalog_refuses_an_unknown_method(catalog, predictor, data):
    with pytest.raises(PlanError, match="frob"):
        _selection(predictor, catalog, data).score_pairs(catalog.names[:3], methods=["frob"])


def test_aggregate_pair_rows_is_numpys_average_min_max():
    rng = np.random.default_rng(0)
    for n_pairs in (1, 2, 3, 7, 8, 9, 21, 33):
        rows = rng.normal(size=(n_pairs, 5)) * 10.0 ** rng.integers(-8, 8, size=(n_pairs, 1))
        weights = rng.random(n_pairs) * 1e3
        for w in (None, weights):
            expected = np.concatenate([np.average(rows, axis=0, weights=w), rows.min(0), rows.max(0)])
            assert np.array_equal(aggregate_pair_rows(rows, w), expected)


def test_score_catalog_rows_columns_and_plot(tmp_path, catalog, predictor, data):
    settings = [OperatorSetting("linear"), OperatorSetting("ties", {"density": 0.5})]
    meta = {"input_feature_names": list(data.feature_names), "settings": [s.to_dict() for s in settings]}
    selection = Selection(predictor, meta, catalog)
    table = selection.score_pairs(catalog.names, methods=["linear", "ties"])
    n = len(catalog.names)
    assert len(table) == n * (n - 1) // 2 * len(settings)
    assert list(table.columns) == [
        "model_a",
        "model_b",
        "method",
        "parameters",
        "predicted_score",
        "uncertainty",
    ]
    assert json.loads(table["parameters"].iloc[-1]) == {"density": 0.5}
    # the same row, predicted directly, agrees with the vectorised table
    a, b = str(table["model_a"].iloc[-1]), str(table["model_b"].iloc[-1])
    direct = predictor.predict(selection.table.rows([Candidate((a, b), (settings[1],))]))[0][0]
    assert table["predicted_score"].iloc[-1] == pytest.approx(direct)
    assert len(best_per_pair(table)) == n * (n - 1) // 2
    write_table(table, tmp_path / "scores.parquet")
    assert len(pd.read_parquet(tmp_path / "scores.parquet")) == len(table)
    assert plot_best_merges(table, tmp_path / "best.png").stat().st_size > 1000
    with pytest.raises(SimMergeError, match=r"\.parquet or \.csv"):
        write_table(table, tmp_path / "scores.xlsx")


def test_recommended_plans_run_through_the_merge_engine(tmp_path, predictor, data):
    """Every kind of recommended plan (pair, k-way, fold) is a plan the engine accepts and merges."""
    from models.synthetic import LATENT_DIM
    from simmerge.engine import merge_state_dict
    from tests.factories import derive_expert, write_tiny_llama

    base = write_tiny_llama(tmp_path / "base", seed=0)
    experts = [str(derive_expert(base, tmp_path / f"e{i}", seed=i + 1)) for i in range(3)]
    rng = np.random.default_rng(0)
    real = SyntheticCatalog(
        experts, {e: ["t"] for e in experts}, {e: rng.normal(size=LATENT_DIM) for e in experts}
    )
    selection = Selection(predictor, {"input_feature_names": data.feature_names}, real)
    plans = selection.recommend_many([PlanQuery(tuple(experts), str(base))], [500])[0]["plans"]
    chosen = {}
    for plan in plans:
        key = (plan["kind"], plan["steps"][-1]["method"])
        chosen.setdefault(key, plan)
    assert {k for k, _ in chosen} == {"pair", "kway", "fold"}
    for plan in chosen.values():
        merged = merge_state_dict(Plan.from_yaml(plan["mergekit_yaml"]))
        assert merged and all(torch.isfinite(t).all() for t in merged.values())


def test_slerp_spelled_from_either_end_has_one_description(catalog):
    table = PlanTable(catalog)

    def row(params, models):
        record = {"method": "slerp", "params_json": json.dumps(params), "models": models, "kind": "pair"}
        return table.rows([label_candidate(record, models)])[0]

    a, b = catalog.names[:2]
    assert np.array_equal(row({"t": 0.3}, [a, b]), row({"t": 0.7}, [b, a]))
    assert not np.array_equal(row({"t": 0.3}, [a, b]), row({"t": 0.3}, [b, a]))


def test_missing_features_are_tolerated_by_every_selector(data):
    """Cross-family pairs have no structural features (NaN): no selector may fail or return NaN."""
    X = data.X.copy()
    X[::3, -4:] = np.nan
    for selector in (LightGBMSelector(seed=0, rounds=20), LassoSelector(seed=0), BestFixedSelector()):
        mean, unc = selector.fit(X, data.y, data.feature_names).predict(X)
        assert np.isfinite(mean).all() and np.isfinite(unc).all()


@pytest.fixture(scope="module")
def expert_and_base(tmp_path_factory):
    from tests.factories import derive_expert, write_tiny_llama

    root = tmp_path_factory.mktemp("identity")
    base = write_tiny_llama(root / "base", seed=0)
    return derive_expert(base, root / "expert", seed=1), base


@pytest.mark.parametrize(
    "setting",
    [
        *DEFAULT_SETTINGS,
        OperatorSetting("task_arithmetic", {"weight": 0.5}),
        OperatorSetting("slerp", {"t": 0.3}),
    ],
    ids=lambda s: s.key,
)
def test_preserves_identity_is_what_the_engine_does_with_two_copies(expert_and_base, setting):
    """The analytic rule recommendations use for identical inputs, checked by merging a checkpoint with itself."""
    from simmerge.checkpoint import Checkpoint
    from simmerge.engine import merge_state_dict

    expert, base = expert_and_base
    paths = {"expert": expert, "copy": expert, "base": base}
    plan = Candidate(("expert", "copy"), (setting,)).to_plan("base")
    merged = merge_state_dict(plan, resolve=lambda name: str(paths[name]))
    original = Checkpoint.open(expert)
    largest = max(float((t - original.read(n).float()).abs().max()) for n, t in merged.items())
    assert (largest < 1e-6) == setting.preserves_identity(2), largest
