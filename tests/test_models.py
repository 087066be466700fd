"""Learned selection: descriptors, training determinism, persistence, metrics, plan search, scoring."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch

from models.baselines import BestFixedSelector, LassoSelector, RandomSelector
from models.dataset import build_dataset, load_labels
from models.descriptors import (
    DEFAULT_SETTINGS,
    OperatorSetting,
    descriptor_names,
    fold_weights,
    operator_descriptor,
)
from models.evaluate import held_out_catalog, held_out_pairs, leave_one_task_out, markdown_table
from models.metrics import evaluate_selection, ndcg_at_k
from models.plan_ranking import PlanQuery
from models.plan_search import Candidate, CandidateFeaturizer, search_plans
from models.predictor import LightGBMSelector, load_selector
from models.recommend import recommend_many, recommend_plans
from models.score_catalog import best_per_pair, plot_best_merges, score_pairs, write_table
from models.synthetic import SyntheticCatalog, make_catalog, make_labels
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
def test_descriptor_fills_defaults_and_separates_families():
    names = descriptor_names()
    ties = dict(zip(names, operator_descriptor("ties", {"density": 0.3}), strict=True))
    linear = dict(zip(names, operator_descriptor("linear", {}), strict=True))
    assert ties["op:family=ties"] == 1 and ties["op:sign_election"] == 1 and ties["op:param=density"] == 0.3
    assert ties["op:param=lambda"] == 1.0  # omitted parameter gets its default
    assert linear["op:family=linear"] == 1 and linear["op:uses_base"] == 0
    assert operator_descriptor("della", {})[names.index("op:family=other")] == 1


def test_descriptor_rejects_non_numeric_parameter():
    with pytest.raises(PlanError, match="density"):
        operator_descriptor("ties", {"density": "half"})


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


# -- plan search, recommendation, catalog scoring ----------------------------------------------------
def test_plan_search_covers_subsets_orders_and_kway(catalog, predictor):
    models = catalog.names[:4]
    scored = search_plans(
        models, predictor, CandidateFeaturizer(catalog), base="base", max_models=3, beam_width=3
    )
    kinds = {s.candidate.kind for s in scored}
    assert kinds == {"pair", "fold", "kway"}
    assert max(len(s.candidate.models) for s in scored) == 3
    assert [s.predicted for s in scored] == sorted((s.predicted for s in scored), reverse=True)
    folds = [s for s in scored if s.candidate.kind == "fold"]
    assert folds and all(len(s.candidate.models) == 3 for s in folds)
    # the order of a fold changes its features (the last model holds half of the result)
    first = folds[0].candidate
    swapped = Candidate((first.models[2], first.models[1], first.models[0]), first.settings)
    rows = CandidateFeaturizer(catalog).rows([first, swapped])
    assert not np.array_equal(rows[0], rows[1])
    with pytest.raises(PlanError, match="at least two"):
        search_plans(models[:1], predictor, CandidateFeaturizer(catalog))


def test_plan_search_without_base_uses_base_free_operators(catalog, predictor):
    scored = search_plans(catalog.names[:3], predictor, CandidateFeaturizer(catalog), base=None)
    assert {s.method for c in scored for s in c.candidate.settings} <= {"linear", "slerp"}


def test_recommendations_for_identical_checkpoints_rank_identity_preserving_merges_top(predictor, data):
    twin = make_catalog(n_tasks=1, per_task=1, seed=11)
    name = twin.names[0]
    twin.names.append(f"{name}-copy")
    twin.vectors[f"{name}-copy"] = twin.vectors[name].copy()
    out = recommend_plans(twin.names, predictor, twin, data.feature_names, top=3, base="base")
    top = out["plans"][0]
    assert top["steps"][0]["method"] in {"linear", "slerp"}  # averaging an expert with itself returns it
    assert top["rank"] == 1 and len(top["drivers"]) == 3
    plan = Plan.from_yaml(top["mergekit_yaml"])
    assert set(plan.experts()) | set(plan.checkpoints()) >= set(twin.names)


def test_recommend_returns_runnable_yaml_for_folds(catalog, predictor, data):
    out = recommend_plans(catalog.names[:3], predictor, catalog, data.feature_names, top=40, base="base")
    fold = next(p for p in out["plans"] if p["kind"] == "fold")
    plan = Plan.from_yaml(fold["mergekit_yaml"])
    assert len(plan.steps) == 2 and plan.steps[1].models[0].model == "step1"
    assert [p["rank"] for p in out["plans"]] == list(range(1, len(out["plans"]) + 1))


def _returns_its_input(candidate):
    from models.descriptors import preserves_identity

    inputs = [len(candidate.models)] if len(candidate.settings) == 1 else [2] * len(candidate.settings)
    return all(preserves_identity(s, n) for s, n in zip(candidate.settings, inputs, strict=True))


def _reference_plans(models, predictor, source, names, *, top, base, max_models=None, identity_first=False):
    """The recommendation computed the slow, plain way: per-candidate rows, SHAP on LightGBM's
    defaults, PyYAML's Python emitter. The fast path must give exactly this."""
    scored = search_plans(models, predictor, CandidateFeaturizer(source), base=base, max_models=max_models)
    if identity_first:  # copies of one checkpoint: plans that return their input first, stably
        scored = sorted(scored, key=lambda s: not _returns_its_input(s.candidate))
    scored = scored[:top]
    rows = np.stack([s.row for s in scored])
    contrib = predictor.boosters["mean"].predict(rows, pred_contrib=True)[:, :-1]
    out = []
    for s, row, values in zip(scored, rows, contrib, strict=True):
        order = np.argsort(-np.abs(values), kind="stable")[:3]
        plan = s.candidate.to_plan(base)
        out.append(
            {
                "models": list(s.candidate.models),
                "steps": s.candidate.steps(),
                "predicted_score": s.predicted,
                "uncertainty": s.uncertainty,
                "mergekit_yaml": plan.to_yaml(),
                "plan": plan.to_dict(),
                "drivers": [
                    {"feature": names[i], "value": float(row[i]), "contribution": float(values[i])}
                    for i in order
                ],
            }
        )
    return out


@pytest.mark.parametrize(
    ("n_models", "base", "max_models"), [(2, "base", None), (4, "base", 3), (3, None, None)]
)
def test_recommend_fast_path_gives_exactly_the_plain_answer(
    catalog, predictor, data, n_models, base, max_models
):
    models = list(reversed(catalog.names[:n_models]))  # reversed names: slerp orientation is exercised
    for _ in range(2):  # second call: memoised descriptors and settings keys must not change anything
        out = recommend_plans(
            models, predictor, catalog, data.feature_names, top=25, base=base, max_models=max_models
        )
        expected = _reference_plans(
            models, predictor, catalog, data.feature_names, top=25, base=base, max_models=max_models
        )
        got = [{k: p[k] for k in expected[0]} for p in out["plans"]]
        assert got == expected
        assert {p["kind"] for p in out["plans"]} >= ({"pair"} if n_models == 2 else {"pair", "fold"})


class _IdentityColumns:
    """A synthetic catalog whose first two columns carry the identity features' names (zero for copies)."""

    def __init__(self, catalog: SyntheticCatalog) -> None:
        self.catalog = catalog
        self.feature_names = ["tv_dist", "js_mean", *catalog.feature_names[2:]]

    def pair_features(self, pairs):
        rows = self.catalog.pair_features(pairs)
        return np.column_stack([rows[:, 1], rows[:, 3], rows[:, 2:]])  # distance, |norm difference|


def test_recommend_many_gives_each_query_its_plain_answer(predictor, data):
    twin = make_catalog(n_tasks=2, per_task=2, seed=11)
    name = twin.names[0]
    twin.names.append(f"{name}-copy")
    twin.vectors[f"{name}-copy"] = twin.vectors[name].copy()
    source = _IdentityColumns(twin)
    queries = [
        PlanQuery((name, f"{name}-copy"), "base"),
        PlanQuery(tuple(twin.names[:3]), "base"),
        PlanQuery(tuple(twin.names[1:4]), None),
    ]
    out = recommend_many(queries, predictor, source, data.feature_names, top=[6, 9, 4])
    for query, k, result, identical in zip(queries, (6, 9, 4), out, (True, False, False), strict=True):
        expected = _reference_plans(
            list(query.models),
            predictor,
            source,
            data.feature_names,
            top=k,
            base=query.base,
            identity_first=identical,
        )
        assert [{key: p[key] for key in expected[0]} for p in result["plans"]] == expected
    assert out[0]["plans"][0]["steps"][0]["method"] in {"linear", "slerp", "task_arithmetic"}
    with pytest.raises(SimMergeError, match="top=0"):
        recommend_many(queries[:1], predictor, source, data.feature_names, top=[0])


def test_rank_plans_batch_equals_search_plans_per_query(catalog, predictor):
    """The array search, many queries in one batch, gives each query exactly `search_plans`' candidates:
    the same plans, rows, predictions and order (3- and 4-step folds, k-way, no base, duplicates)."""
    from models.plan_ranking import SettingTable, pair_rows_for, rank_plans

    names = catalog.names
    queries = [
        PlanQuery(tuple(names[:2]), "base"),
        PlanQuery(tuple(reversed(names[:3])), "base"),
        PlanQuery(tuple(names[2:7]), "base", 4),
        PlanQuery(tuple(names[1:5]), None),
        PlanQuery((names[4], names[4], names[0], names[3]), "base", 3),
        PlanQuery(tuple(names[:6]), "base"),  # folds of six: 15 member pairs per aggregate
    ]
    table = SettingTable(DEFAULT_SETTINGS)
    ranked = rank_plans(
        queries, predictor, pair_rows_for(catalog, queries), table, top=[1000] * len(queries), beam_width=3
    )
    for query, got in zip(queries, ranked, strict=True):
        expected = search_plans(
            query.models,
            predictor,
            CandidateFeaturizer(catalog),
            base=query.base,
            max_models=query.max_models,
            beam_width=3,
        )
        assert [s.candidate for s in got] == [s.candidate for s in expected]
        assert [(s.predicted, s.uncertainty) for s in got] == [(s.predicted, s.uncertainty) for s in expected]
        assert np.array_equal(np.stack([s.row for s in got]), np.stack([s.row for s in expected]))
    assert max(len(s.candidate.settings) for s in ranked[2]) == 3  # 4-member folds were searched
    with pytest.raises(PlanError, match="at least two"):
        rank_plans([PlanQuery((names[0], names[0]))], predictor, pair_rows_for(catalog, []), table, top=[3])


def test_descriptor_rows_are_numpys_weighted_average_of_the_steps():
    """Descriptors (made by `descriptor_rows` for one plan or many) equal np.average of the step vectors
    weighted 2^i, then the kind and the counts, bit for bit; one at a time and batched alike."""
    from models.descriptors import KINDS, descriptor_rows, fold_descriptor, step_vectors

    settings = list(DEFAULT_SETTINGS)
    plain, flipped = step_vectors(settings), step_vectors(settings, flipped=True)
    for n_steps, n_models, kind in ((1, 2, "pair"), (1, 4, "kway"), (2, 3, "fold"), (3, 4, "fold")):
        picks = np.random.default_rng(n_steps).integers(0, len(settings), size=(12, n_steps))
        for models, vectors in ((("a", "b", "c", "d"), plain), (("b", "a"), flipped)):
            if n_steps > 1 and vectors is flipped:
                continue
            rows = descriptor_rows(vectors[picks], n_models)
            for row, pick in zip(rows, picks, strict=True):
                body = np.average(vectors[pick], axis=0, weights=2.0 ** np.arange(n_steps))
                tail = [1.0 if kind == k else 0.0 for k in KINDS] + [float(n_models), float(n_steps)]
                assert np.array_equal(row, np.concatenate([body, tail]))
                chosen = [settings[i] for i in pick]
                assert np.array_equal(row, fold_descriptor(chosen, n_models, models[:n_models]))


def test_aggregate_pair_rows_is_numpys_average_min_max():
    from models.dataset import aggregate_pair_rows

    rng = np.random.default_rng(0)
    for n_pairs in (1, 2, 3, 7, 8, 9, 21, 33):
        rows = rng.normal(size=(n_pairs, 5)) * 10.0 ** rng.integers(-8, 8, size=(n_pairs, 1))
        weights = rng.random(n_pairs) * 1e3
        for w in (None, weights):
            expected = np.concatenate([np.average(rows, axis=0, weights=w), rows.min(0), rows.max(0)])
            assert np.array_equal(aggregate_pair_rows(rows, w), expected)


def test_score_catalog_rows_columns_and_plot(tmp_path, catalog, predictor):
    settings = [OperatorSetting("linear"), OperatorSetting("ties", {"density": 0.5})]
    table = score_pairs(catalog.names, predictor, catalog, settings)
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
    featurizer = CandidateFeaturizer(catalog)
    a, b = str(table["model_a"].iloc[-1]), str(table["model_b"].iloc[-1])
    direct = predictor.predict(featurizer.rows([Candidate((a, b), (settings[1],))]))[0][0]
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
    plans = recommend_plans(experts, predictor, real, data.feature_names, top=500, base=str(base))["plans"]
    chosen = {}
    for plan in plans:
        key = (plan["kind"], plan["steps"][-1]["method"])
        chosen.setdefault(key, plan)
    assert {k for k, _ in chosen} == {"pair", "kway", "fold"}
    for plan in chosen.values():
        merged = merge_state_dict(Plan.from_yaml(plan["mergekit_yaml"]))
        assert merged and all(torch.isfinite(t).all() for t in merged.values())


def test_slerp_spelled_from_either_end_has_one_description():
    from models.dataset import row_descriptor

    forward = {"method": "slerp", "params_json": '{"t": 0.3}', "models": ["a", "b"], "kind": "pair"}
    backward = {"method": "slerp", "params_json": '{"t": 0.7}', "models": ["b", "a"], "kind": "pair"}
    other = {"method": "slerp", "params_json": '{"t": 0.3}', "models": ["b", "a"], "kind": "pair"}
    assert np.array_equal(row_descriptor(forward, 2), row_descriptor(backward, 2))
    assert not np.array_equal(row_descriptor(forward, 2), row_descriptor(other, 2))


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
    from models.descriptors import preserves_identity
    from simmerge.checkpoint import Checkpoint
    from simmerge.engine import merge_state_dict

    expert, base = expert_and_base
    paths = {"expert": expert, "copy": expert, "base": base}
    plan = Candidate(("expert", "copy"), (setting,)).to_plan("base")
    merged = merge_state_dict(plan, resolve=lambda name: str(paths[name]))
    original = Checkpoint.open(expert)
    largest = max(float((t - original.read(n).float()).abs().max()) for n, t in merged.items())
    assert (largest < 1e-6) == preserves_identity(setting, 2), largest
