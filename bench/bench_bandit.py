"""Replay benchmark of the contextual bandit on labelled pair pools.

Pools (every labelled operator setting of one pair) are streamed in random order; a policy picks one
setting, and only that setting's measured score is revealed. Regret = pool oracle − revealed score.
Policies: linear UCB and linear Thompson sampling (context = pair features, prior = the regressor's
prediction), the static regressor, the best fixed operator, random. Three runs:

1. standard: the regressor and best fixed are trained on half the pools; the other half is streamed;
2. withheld family: one operator family is absent from training and from the arms until halfway,
   then added (`add_arm`) — for every policy that can use it;
3. new task: pools touching one task's experts are absent from training and appear only halfway.

Writes `bench/bandit_regret.png` and the `bandit` section of BENCHMARKS.md.

    python -m bench.bench_bandit [--labels L --zoo Z | --pair-features F] [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.report import write_section
from models.bandit import LinearBandit
from models.baselines import BestFixedSelector
from models.dataset import Dataset, build_dataset, load_labels
from models.descriptors import ARM_FEATURE_NAMES, family_of
from models.metrics import pool_indices
from models.predictor import LightGBMSelector
from models.synthetic import make_catalog, make_labels

PLOT = Path(__file__).resolve().parent / "bandit_regret.png"
POLICIES = ("ucb", "thompson", "regressor", "best_fixed", "random")
MAX_CONTEXT = 12


@dataclass
class Pool:
    key: str
    context: np.ndarray
    settings: list[str]  # setting key per row
    X: np.ndarray
    y: np.ndarray
    tasks: set[str]


def _pools(data: Dataset, model_tasks) -> list[Pool]:
    n_desc = sum(1 for n in data.feature_names if n.startswith("op:"))
    n_pair = (len(data.feature_names) - n_desc) // 3
    out = []
    for group in pool_indices(data.pools):
        members = data.models[group[0]]
        tasks = {t for m in members for t in (model_tasks or {}).get(m, [])}
        context = data.X[group[0], n_desc : n_desc + n_pair]  # the pair's (mean) features
        out.append(
            Pool(
                data.pools[group[0]], context, list(data.settings[group]), data.X[group], data.y[group], tasks
            )
        )
    return out


def _setting_arms(data: Dataset) -> dict[str, np.ndarray]:
    n_arm = len(ARM_FEATURE_NAMES)
    arms = {}
    for key, row in zip(data.settings, data.X, strict=True):
        arms.setdefault(key, row[:n_arm])
    return arms


class Projection:
    """Standardise contexts on the training pools and keep at most MAX_CONTEXT principal components."""

    def __init__(self, contexts: np.ndarray) -> None:
        self.center = np.nan_to_num(np.nanmean(contexts, axis=0))
        std = np.nan_to_num(np.nanstd(contexts, axis=0))
        self.scale = np.where(std > 1e-12, std, 1.0)
        z = np.nan_to_num((contexts - self.center) / self.scale)
        _, _, vt = np.linalg.svd(z, full_matrices=False)
        self.basis = vt[: min(MAX_CONTEXT, vt.shape[0])].T
        projected = z @ self.basis
        self.out_scale = np.where(projected.std(axis=0) > 1e-12, projected.std(axis=0), 1.0)

    def __call__(self, context: np.ndarray) -> np.ndarray:
        return np.nan_to_num((context - self.center) / self.scale) @ self.basis / self.out_scale

    @property
    def dim(self) -> int:
        return self.basis.shape[1]


def replay(
    train: list[Pool],
    stream: list[Pool],
    late: list[Pool],
    arms: dict[str, np.ndarray],
    feature_names: list[str],
    rounds: int,
    seed: int,
    withheld: set[str] = frozenset(),
) -> dict[str, np.ndarray]:
    """Cumulative regret per policy. `late` pools and `withheld` settings join halfway."""
    fit_rows = [
        (x, y, s) for p in train for x, y, s in zip(p.X, p.y, p.settings, strict=True) if s not in withheld
    ]
    X = np.stack([r[0] for r in fit_rows])
    y = np.asarray([r[1] for r in fit_rows])
    regressor = LightGBMSelector(seed=seed).fit(X, y, feature_names)
    fixed = BestFixedSelector().fit(X, y, feature_names)
    chance = np.random.default_rng(seed + 1)
    project = Projection(np.stack([p.context for p in train]))
    bandits = {}
    for policy in ("ucb", "thompson"):
        bandit = LinearBandit(
            context_dim=project.dim, arm_dim=len(ARM_FEATURE_NAMES), policy=policy, seed=seed
        )
        for key, vec in arms.items():
            if key not in withheld:
                bandit.add_arm(key, vec)
        bandits[policy] = bandit
    rng = np.random.default_rng(seed)
    regret = {p: np.zeros(rounds) for p in POLICIES}
    for t in range(rounds):
        half = t >= rounds // 2
        if half and withheld and t == rounds // 2:
            for bandit in bandits.values():
                for key in sorted(withheld):
                    bandit.add_arm(key, arms[key])
        pools = stream + (late if half else [])
        pool = pools[int(rng.integers(len(pools)))]
        allowed = np.asarray([half or s not in withheld for s in pool.settings])
        rows = np.flatnonzero(allowed)
        oracle = pool.y[rows].max()
        prediction, _ = regressor.predict(pool.X[rows])
        context = project(pool.context)
        priors = dict(zip([pool.settings[i] for i in rows], prediction, strict=True))
        picks = {
            "regressor": rows[int(np.argmax(prediction))],
            "best_fixed": rows[int(np.argmax(fixed.predict(pool.X[rows])[0]))],
            "random": rows[int(chance.integers(len(rows)))],
        }
        for policy, bandit in bandits.items():
            arm = bandit.select(context, priors, [pool.settings[i] for i in rows])
            row = rows[[pool.settings[i] for i in rows].index(arm)]
            bandit.update(context, arm, float(pool.y[row]), priors[arm])
            picks[policy] = row
        for policy, row in picks.items():
            regret[policy][t] = oracle - pool.y[row]
    return {p: np.cumsum(r) for p, r in regret.items()}


def _split(pools: list[Pool], seed: int) -> tuple[list[Pool], list[Pool]]:
    order = np.random.default_rng(seed).permutation(len(pools))
    half = len(pools) // 2
    return [pools[i] for i in order[:half]], [pools[i] for i in order[half:]]


def _most_winning_family(pools: list[Pool]) -> str:
    wins: dict[str, int] = {}
    for p in pools:
        family = family_of(p.settings[int(np.argmax(p.y))].split("{")[0].split("(")[0])
        wins[family] = wins.get(family, 0) + 1
    return max(sorted(wins), key=lambda f: wins[f])


def _plot(runs: dict[str, dict[str, np.ndarray]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3
    rows = (len(runs) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(runs) :]:
        ax.axis("off")
    styles = {"ucb": "-", "thompson": "-", "regressor": "--", "best_fixed": ":", "random": "-."}
    for ax, (title, curves) in zip(axes.ravel(), runs.items(), strict=False):
        for policy, curve in curves.items():
            ax.plot(curve, styles[policy], label=policy, linewidth=1.6)
        ax.axvline(len(next(iter(curves.values()))) // 2, color="grey", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("cumulative regret (symlog)")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_all(
    frame, source, tasks, rounds: int, seed: int
) -> tuple[dict[str, dict[str, np.ndarray]], int, int, int]:
    """The three replays on one labels table: standard, withheld family, unseen task."""
    two_way = frame["kind"].fillna("pair").isin(["pair", "cross_family"])
    data = build_dataset(frame[two_way].reset_index(drop=True), source)
    pools = _pools(data, tasks)
    arms = _setting_arms(data)
    train, stream = _split(pools, seed)
    runs: dict[str, dict[str, np.ndarray]] = {}
    runs["standard (regressor trained on the other half)"] = replay(
        train, stream, [], arms, data.feature_names, rounds, seed
    )
    family = _most_winning_family(stream)
    withheld = {k for k in arms if family_of(k.split("{")[0]) == family}
    if len(withheld) < len(arms):
        runs[f"family '{family}' withheld, added halfway"] = replay(
            train, stream, [], arms, data.feature_names, rounds, seed, withheld
        )
    for new in sorted({t for p in pools for t in p.tasks}, reverse=True):
        old_train = [p for p in train if new not in p.tasks]
        old_stream = [p for p in stream if new not in p.tasks]
        late = [p for p in pools if new in p.tasks]
        if len(old_train) >= 2 and old_stream and late:
            runs[f"task '{new}' unseen until halfway"] = replay(
                old_train, old_stream, late, arms, data.feature_names, rounds, seed
            )
            break
    return runs, len(pools), len(arms), len(stream)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, help="Real labels; the synthetic catalog is replayed as well.")
    parser.add_argument("--zoo", type=Path)
    parser.add_argument("--pair-features", type=Path)
    parser.add_argument("--home", type=Path, default=Path(".cache/bench-home"))
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    datasets = []
    if args.labels:
        from models.api import home_source
        from models.dataset import model_tasks_from_labels
        from models.sources import labels_zoo

        frame = load_labels(args.labels)
        source = home_source(args.home, args.pair_features, args.zoo or labels_zoo(args.labels))
        datasets.append((f"real labels `{args.labels}`", frame, source, model_tasks_from_labels(frame)))
    catalog = make_catalog(n_tasks=5, per_task=4, seed=0)
    datasets.append(
        (
            "**synthetic** catalog (`models.synthetic`, 20 experts of 5 tasks)",
            make_labels(catalog, seed=0),
            catalog,
            catalog.tasks,
        )
    )

    lines, all_runs = [], {}
    for origin, frame, source, tasks in datasets:
        runs, n_pools, n_arms, n_stream = run_all(frame, source, tasks, args.rounds, args.seed)
        tag = "real" if origin.startswith("real") else "synthetic"
        all_runs.update({f"{tag}: {title}": curves for title, curves in runs.items()})
        lines += [
            f"Data: {origin}; {n_pools} two-model pools × {n_arms} operator settings; {args.rounds} rounds per run; "
            f"only the chosen setting's score is revealed. Half the pools train the regressor, {n_stream} are "
            f"streamed, so each recurs ~{args.rounds // max(n_stream, 1)} times: the bandits can learn per pair, "
            "the static policies cannot.\n",
            "| run | " + " | ".join(POLICIES) + " |",
            "|---|" + "---|" * len(POLICIES),
        ]
        for title, curves in runs.items():
            lines.append(f"| {title} | " + " | ".join(f"{curves[p][-1]:.2f}" for p in POLICIES) + " |")
        lines.append("")
    _plot(all_runs, PLOT)
    lines += [
        "Cells: cumulative regret (sum over rounds of pool oracle − revealed score) at the last round; lower is better.",
        "",
        "![cumulative regret](bench/bandit_regret.png)",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(
            "bandit",
            "Contextual bandit (replay)",
            " ".join(["python -m bench.bench_bandit", *(argv or sys.argv[1:])]),
            text,
        )


if __name__ == "__main__":
    main()
