"""Headroom: how much a per-pool choice of merge could gain over the best single fixed operator.

Per operator setting: mean normalised held-in score, how often it is the best plan of its pool (a
pool = every plan over the same set of checkpoints), the best fixed operator (the setting with the
best mean over the pools, among settings labelled in every pool), the oracle mean (best plan per
pool), and the gap between them: the most any selector could close. Pair pools, triple pools (k-way
and folds) and cross-family pools are reported separately, since they offer different settings.

    python -m bench.headroom --labels FILE.parquet [--zoo DIR [--grid default] [--workers N]]

With `--zoo`, the zoo is labelled first (resuming FILE); the labelling wall time reported is the
one accumulated in FILE's metadata over every run that wrote it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.report import write_section

GROUPS = {  # `self` plans (an expert with itself) are no selection problem: no headroom group
    "pair": "same-base pairs",
    "kway": "triples",
    "fold": "triples",
    "cross_family": "cross-family pairs",
}
TIE = 1e-12


@dataclass
class SettingStats:
    setting: str
    pools: int
    mean_held_in: float
    mean_held_out: float | None
    best_share: float  # fraction of its pools where it scores the pool's best (ties count for all)


@dataclass
class GroupHeadroom:
    group: str
    pools: int
    plans: int
    settings: list[SettingStats]
    best_fixed: str
    best_fixed_mean: float
    oracle_mean: float
    random_mean: float  # the expected score of picking a plan of the pool uniformly at random

    @property
    def gap(self) -> float:
        return self.oracle_mean - self.best_fixed_mean


def _fmt_params(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(params.items()))


def setting_key(row: dict[str, Any]) -> str:
    """The operator setting of a row, independent of its checkpoints but not of their order where it
    matters: slerp says whether it starts from the alphabetically first checkpoint, a fold which
    member (by name order) it folds in at each position."""
    params = json.loads(row["params_json"])
    ranks = {m: i + 1 for i, m in enumerate(sorted(set(row["models"])))}
    if row["kind"] == "fold":
        steps = ">".join(f"{s['method']}({_fmt_params(s['parameters'])})" for s in params["steps"])
        return f"fold {steps} order {''.join(str(ranks[m]) for m in row['models'])}"
    text = f"{row['method']}({_fmt_params(params)})"
    if row["method"] == "slerp":
        text += " from 1st" if row["models"][0] == min(row["models"]) else " from 2nd"
    return f"k-way {text}" if row["kind"] == "kway" else text


def headroom(rows: Sequence[dict[str, Any]]) -> list[GroupHeadroom]:
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["kind"] in GROUPS and row["held_in_score"] is not None and math.isfinite(row["held_in_score"]):
            by_group[GROUPS[row["kind"]]].append(row)
    return [
        _group_headroom(name, by_group[name]) for name in dict.fromkeys(GROUPS.values()) if by_group[name]
    ]


def _group_headroom(group: str, rows: list[dict[str, Any]]) -> GroupHeadroom:
    pools: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)  # pool → setting → row (best if repeated)
    for row in rows:
        pool, setting = "|".join(sorted(set(row["models"]))), setting_key(row)
        kept = pools[pool].get(setting)
        if kept is None or row["held_in_score"] > kept["held_in_score"]:
            pools[pool][setting] = row
    scores: dict[str, list[float]] = defaultdict(list)
    held_out: dict[str, list[float]] = defaultdict(list)
    best_counts: dict[str, int] = defaultdict(int)
    for by_setting in pools.values():
        best = max(r["held_in_score"] for r in by_setting.values())
        for setting, row in by_setting.items():
            scores[setting].append(row["held_in_score"])
            if row["held_out_score"] is not None:
                held_out[setting].append(row["held_out_score"])
            best_counts[setting] += row["held_in_score"] >= best - TIE
    stats = sorted(
        (
            SettingStats(
                s,
                len(v),
                sum(v) / len(v),
                sum(held_out[s]) / len(held_out[s]) if held_out[s] else None,
                best_counts[s] / len(v),
            )
            for s, v in scores.items()
        ),
        key=lambda st: -st.mean_held_in,
    )
    everywhere = [st for st in stats if st.pools == len(pools)] or stats
    best_fixed = everywhere[0]
    oracle = [max(r["held_in_score"] for r in p.values()) for p in pools.values()]
    random_pick = [sum(r["held_in_score"] for r in p.values()) / len(p) for p in pools.values()]
    return GroupHeadroom(
        group,
        len(pools),
        len(rows),
        stats,
        best_fixed.setting,
        best_fixed.mean_held_in,
        sum(oracle) / len(oracle),
        sum(random_pick) / len(random_pick),
    )


def render(groups: Sequence[GroupHeadroom], facts: dict[str, Any]) -> str:
    lines = [
        f"Labels: `{facts['labels']}` — {facts['rows']} plans on the **{facts['zoo_size']}** zoo "
        f"(seed {facts['zoo_seed']}, `{facts['zoo']}`); labelling wall time {facts['wall_seconds']:.0f} s for "
        f"the {facts['stored']} plans stored ({facts['per_plan']:.2f} s per plan: merge + scoring on "
        f"{facts['tasks']} tasks). Scores are "
        "normalised held-in scores (merged / best parent trained on the task, averaged over the merged "
        "experts' tasks; 1.0 = as good as the experts). *Best in pool*: share of its pools where the "
        "setting's plan is the pool's best (ties count for each).",
        "",
        "| pools | plans | best fixed operator | best fixed mean | oracle mean | gap (oracle − best fixed) "
        "| random-pick mean |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for g in groups:
        lines.append(
            f"| {g.group} ({g.pools}) | {g.plans} | `{g.best_fixed}` | {g.best_fixed_mean:.3f} "
            f"| {g.oracle_mean:.3f} | {g.gap:.3f} | {g.random_mean:.3f} |"
        )
    for g in groups:
        lines += [
            "",
            f"**{g.group}** — {g.pools} pools",
            "",
            "| setting | pools | mean held-in | best in pool | mean held-out |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for st in g.settings:
            out = "–" if st.mean_held_out is None else f"{st.mean_held_out:.3f}"
            marker = " **(best fixed)**" if st.setting == g.best_fixed else ""
            lines.append(
                f"| `{st.setting}`{marker} | {st.pools} | {st.mean_held_in:.3f} | {st.best_share:.0%} | {out} |"
            )
    return "\n".join(lines)


def _facts(labels: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any], stored: int) -> dict[str, Any]:
    """What the section says about the run; the wall time covers every row stored, in the grid or not."""
    zoo_dir = Path(meta.get("zoo", "?"))
    catalog: dict[str, Any] = {}
    if (zoo_dir / "catalog.json").is_file():
        catalog = json.loads((zoo_dir / "catalog.json").read_text())
    wall = float(meta.get("wall_seconds", 0.0))
    return {
        "labels": labels,
        "rows": len(rows),
        "zoo": zoo_dir,
        "zoo_size": catalog.get("size", "?"),
        "zoo_seed": catalog.get("seed", "?"),
        "tasks": len(catalog.get("tasks", [])),
        "wall_seconds": wall,
        "stored": stored,
        "per_plan": wall / max(1, stored),
    }


def _labelled_rows(args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]]]:
    """The labels file's rows; with --zoo, label the grid first and keep only the grid's plans."""
    if args.zoo is None:
        table = pq.read_table(args.labels)
        return table, table.to_pylist()
    from simmerge.labels import enumerate_plans, label_zoo, read_zoo

    label_zoo(args.zoo, args.labels, grid=args.grid, workers=args.workers, seed=args.seed)
    grid_ids = {p.plan_id for p in enumerate_plans(read_zoo(args.zoo), args.grid, seed=args.seed)}
    table = pq.read_table(args.labels)
    return table, [r for r in table.to_pylist() if r["plan_id"] in grid_ids]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, required=True, help="Labels file (Parquet) to read or extend.")
    parser.add_argument("--zoo", type=Path, default=None, help="Label this zoo first (resuming --labels).")
    parser.add_argument("--grid", default="default", choices=["default", "small"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="A sentence appended to the section (e.g. why this zoo).")
    parser.add_argument("--no-write", action="store_true", help="Print the section instead of writing it.")
    args = parser.parse_args(argv)
    table, rows = _labelled_rows(args)
    meta = json.loads((table.schema.metadata or {}).get(b"simmerge.labels", b"{}"))
    body = render(headroom(rows), _facts(args.labels, rows, meta, table.num_rows))
    if args.note:
        body = f"{args.note}\n\n{body}"
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != args.note]
    command = "python -m bench.headroom " + " ".join(a for a in shown if a != "--note")
    if args.no_write:
        print(body)
    else:
        write_section(
            "headroom", "Headroom: best fixed operator vs oracle (ground-truth labels)", command, body
        )
        print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
