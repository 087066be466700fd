"""Rebuild the predictor shipped in `models/default/` (`make predictor`).

Trains on the first labels file that exists — the full zoo's, else the ci zoo's — with pair features
from the features package over the labelled zoo (signatures cached in `--home`), and records which
labels it used in `meta.json` (`provenance`).

    python -m models.build_default --labels FULL.parquet --labels CI.parquet [--home DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.api import DEFAULT_PREDICTOR, train_selectors
from models.predictor import META_FILE, _write_json
from models.sources import FeaturesPackageSource, labels_zoo, zoo_paths
from simmerge.errors import NotFoundError
from simmerge.home import resolve_home


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, action="append", required=True, help="Candidates, best first.")
    parser.add_argument(
        "--zoo", type=Path, default=None, help="The labelled zoo [default: from the labels file]."
    )
    parser.add_argument("--home", type=Path, default=None, help="Where signatures are cached.")
    parser.add_argument("--out", type=Path, default=DEFAULT_PREDICTOR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    labels = next((p for p in args.labels if p.exists()), None)
    if labels is None:
        raise NotFoundError(f"none of the labels files exist: {', '.join(map(str, args.labels))}")
    zoo = args.zoo or labels_zoo(labels)
    if zoo is None:
        raise NotFoundError(f"cannot tell which zoo {labels} was made on; pass --zoo")
    source = FeaturesPackageSource(resolve_home(args.home), zoo_paths(zoo))
    meta = train_selectors(labels, source, args.out, seed=args.seed, schema_version=source.schema_version)
    meta["provenance"] = {"labels": str(labels), "zoo": str(zoo), "zoo_size": _zoo_size(zoo)}
    _write_json(args.out / META_FILE, meta)
    validation = meta.get("validation", {})
    summary = {k: round(v["gap_closed"], 3) for k, v in validation.items() if isinstance(v, dict)}
    print(
        f"trained on {labels} ({meta['n_rows']} plans, zoo {zoo}) → {args.out}; held-out-pair gap closed {summary}"
    )


def _zoo_size(zoo: Path) -> str:
    try:
        return str(json.loads((zoo / "catalog.json").read_text()).get("size", "unknown"))
    except (OSError, json.JSONDecodeError):
        return "unknown"


if __name__ == "__main__":
    main()
