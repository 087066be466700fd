"""Selection quality: predictor vs best fixed, Lasso, random, oracle (docs/design.md §4); plan search on triples.

With `--labels` (from `simmerge label`) it uses real labels and the features package (or
`--pair-features` tables); without, it runs on the synthetic catalog of `models.synthetic` and says so.
Writes the `selection` section of BENCHMARKS.md.

    python -m bench.bench_selection [--labels L --zoo Z --holdout-labels L2 --holdout-zoo Z2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import write_section
from models.baselines import BestFixedSelector
from models.dataset import SELF_ROW_WEIGHT, Dataset, build_dataset, load_labels
from models.evaluate import SELECTORS, evaluate_all, fit_selector, markdown_table
from models.metrics import evaluate_selection, pool_indices
from models.plans import PlanQuery, search
from models.synthetic import make_catalog, make_labels
from models.table import PlanTable


def _synthetic_inputs(root: Path):
    train_cat = make_catalog(n_tasks=4, per_task=3, seed=0)
    test_cat = make_catalog(n_tasks=3, per_task=3, seed=1, task_offset=10)
    make_labels(train_cat, seed=0, triples=30).to_parquet(root / "train.parquet")
    make_labels(test_cat, seed=1, triples=30).to_parquet(root / "test.parquet")
    return root / "train.parquet", train_cat, root / "test.parquet", test_cat, train_cat.tasks


def _triples(train: Dataset, test: Dataset, seed: int) -> tuple[str, dict]:
    """Multi-way pools of the held-out catalog: trained on pairs only, and on pairs + multi-way plans."""
    multi_test = test.subset(np.asarray([len(m) > 2 for m in test.models]))
    multi_train = train.subset(np.asarray([len(m) > 2 for m in train.models]))
    if len(multi_test) == 0 or len(multi_train) == 0:
        return "No multi-way labels: plan search not measured.\n", {}
    fixed = BestFixedSelector().fit(multi_train.X, multi_train.y, multi_train.feature_names)
    fixed_pred = fixed.predict(multi_test.X)[0]
    pairs_only = train.subset(train.kinds == "pair")
    rows = {}
    for label, data in (
        ("predictor, trained on pairs only", pairs_only),
        ("predictor, pairs + multi-way", train),
    ):
        model = fit_selector("lightgbm", data, seed)
        rows[label] = evaluate_selection(
            multi_test.pools, multi_test.y, model.predict(multi_test.X)[0], fixed_pred
        )
    rows["best fixed k-way operator"] = evaluate_selection(
        multi_test.pools, multi_test.y, fixed_pred, fixed_pred
    )
    rows["oracle"] = evaluate_selection(multi_test.pools, multi_test.y, multi_test.y, fixed_pred)
    table = markdown_table({"triples (held-out catalog)": rows})
    return table + "\n", {"n_pools": len(pool_indices(multi_test.pools))}


def _catalog_gap_by_seed(train: Dataset, test: Dataset, seeds: int = 3) -> list[float]:
    """The predictor's held-out-catalog gap closed for several training seeds: how much is luck."""
    from models.evaluate import held_out_catalog

    return [
        held_out_catalog(train, test, seed, ("lightgbm", "best_fixed")).reports()["lightgbm"].gap_closed
        for seed in range(seeds)
    ]


def _zoo_triples(data: Dataset, seed: int, folds: int = 4) -> str:
    """The training zoo's own multi-way pools, each held out in turn (GroupKFold): the predictor trains on
    every other row (pairs and the other triples), the best fixed k-way operator on the other triples."""
    from sklearn.model_selection import GroupKFold

    multi = np.asarray([len(m) > 2 for m in data.models]) & data.evaluable
    pools = data.pools[multi]
    if len(set(pools)) < 2:
        return ""
    rows = np.flatnonzero(multi)
    measured, predicted, fixed, keys = [], [], [], []
    splitter = GroupKFold(n_splits=min(folds, len(set(pools))))
    for _, test_idx in splitter.split(rows, groups=pools):
        test_rows = rows[test_idx]
        held = np.isin(data.pools, data.pools[test_rows])
        train, test = data.subset(~held), data.subset(np.isin(np.arange(len(data)), test_rows))
        train_multi = train.subset(np.asarray([len(m) > 2 for m in train.models]) & train.evaluable)
        model = fit_selector("lightgbm", train, seed)
        best_fixed = BestFixedSelector().fit(train_multi.X, train_multi.y, train_multi.feature_names)
        measured.append(test.y)
        predicted.append(model.predict(test.X)[0])
        fixed.append(best_fixed.predict(test.X)[0])
        keys.append(test.pools)
    pool_keys, y = np.concatenate(keys), np.concatenate(measured)
    fixed_pred = np.concatenate(fixed)
    rows_out = {
        "predictor (pairs + other triples)": evaluate_selection(
            pool_keys, y, np.concatenate(predicted), fixed_pred
        ),
        "best fixed k-way operator": evaluate_selection(pool_keys, y, fixed_pred, fixed_pred),
        "oracle": evaluate_selection(pool_keys, y, y, fixed_pred),
    }
    return markdown_table({"triples (training zoo, held out in turn)": rows_out}) + "\n"


def _beam_hits(model, test: Dataset, source, settings) -> str:
    """How often the beam search's best plan over a triple's checkpoints is one that was measured, and its regret."""
    multi = test.subset(np.asarray([len(m) > 2 for m in test.models]))
    if len(multi) == 0:
        return ""
    table = PlanTable(source, test.feature_names)
    measured = {}
    for members, y in zip(multi.models, multi.y, strict=True):
        measured.setdefault("|".join(sorted(members)), []).append(y)
    hits, regrets, started = 0, [], time.perf_counter()
    groups = pool_indices(multi.pools)
    for group in groups:
        members = multi.models[group[0]]
        query = PlanQuery(tuple(members), "base", 3)
        scored = search([query], lambda cands: table.score(model, cands), settings)[0]
        best_triple = next(s for s in scored if len(s.candidate.models) == 3)
        rows = table.rows([best_triple.candidate])
        # a measured plan with the same features is the same plan (same members, order and operators)
        match = np.flatnonzero(np.all(np.isclose(multi.X[group], rows[0]), axis=1))
        if match.size:
            hits += 1
            regrets.append(multi.y[group].max() - multi.y[group][match[0]])
    elapsed = time.perf_counter() - started
    mean_regret = f"{np.mean(regrets):.4f}" if regrets else "n/a"
    return (
        f"Beam search (width 8, ≤3 models, every subset, order and per-step operator) over each triple: its best "
        f"3-model plan was among the measured plans in {hits}/{len(groups)} pools (mean regret there {mean_regret}); "
        f"{elapsed / max(len(groups), 1) * 1000:.0f} ms per search.\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path)
    parser.add_argument("--holdout-labels", type=Path)
    parser.add_argument("--zoo", type=Path)
    parser.add_argument("--holdout-zoo", type=Path)
    parser.add_argument("--pair-features", type=Path)
    parser.add_argument("--holdout-pair-features", type=Path)
    parser.add_argument("--home", type=Path, default=Path(".cache/bench-home"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave BENCHMARKS.md alone.")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.labels:
            from models.api import home_source
            from models.sources import labels_zoo

            labels, holdout = args.labels, args.holdout_labels
            args.zoo = args.zoo or labels_zoo(labels)
            holdout_zoo = args.holdout_zoo or (labels_zoo(holdout) if holdout else None)
            source = home_source(args.home, args.pair_features, args.zoo)
            holdout_source = (
                home_source(args.home, args.holdout_pair_features, holdout_zoo) if holdout else None
            )
            tasks = None
            origin = f"real labels `{labels}`" + (f", held-out catalog `{holdout}`" if holdout else "")
        else:
            labels, source, holdout, holdout_source, tasks = _synthetic_inputs(Path(tmp))
            origin = (
                "**synthetic** catalog (`models.synthetic`: 12 experts of 4 tasks for training, 9 experts of 3 other "
                "tasks and another seed held out; known score function + noise) — real labels had not landed"
            )
        started = time.perf_counter()
        results = evaluate_all(
            labels,
            source,
            holdout_labels=holdout,
            holdout_source=holdout_source,
            zoo=args.zoo,
            model_tasks=tasks,
            seed=args.seed,
            names=tuple(SELECTORS),
        )
        elapsed = time.perf_counter() - started
        body = [f"Data: {origin}.\n", markdown_table(results), ""]
        body.append(
            f"All protocols: {elapsed:.1f} s. Gap closed = (mean selected − mean best fixed) / (mean oracle − mean best fixed), means over pools. "
            f"`self` plans (an expert merged with itself) train the predictor at weight {SELF_ROW_WEIGHT} and are "
            "never a test pool; the baselines train on the selection plans only.\n"
        )
        if holdout is not None:
            train = build_dataset(load_labels(labels), source)
            test = build_dataset(load_labels(holdout), holdout_source)
            table, _ = _triples(train, test, args.seed)
            body += ["### Multi-way plans (plan search)\n", table, _zoo_triples(train, args.seed)]
            model = fit_selector("lightgbm", train, args.seed)
            from models.api import labelled_settings

            settings = labelled_settings(load_labels(labels))
            body.append(_beam_hits(model, test, holdout_source, settings))
            gap = results["held-out catalog"]["lightgbm"].gap_closed
            seeds = _catalog_gap_by_seed(train, test)
            spread = ", ".join(f"{g:.1%}" for g in seeds)
            body.append(
                f"\nHeld-out catalog gap closed by the predictor: **{gap:.1%}** (target ≥ 50%); with training "
                f"seeds 0-{len(seeds) - 1}: {spread} (mean {np.mean(seeds):.1%}).\n"
            )
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_section(
            "selection",
            "Learned selection",
            " ".join(["python -m bench.bench_selection", *(argv or sys.argv[1:])]),
            text,
        )


if __name__ == "__main__":
    main()
