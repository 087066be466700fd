"""`make bench-features`: signature cost against its floors, signature size, pairwise throughput.

- Structural signature vs one read of the weights (`Checkpoint.read` of every tensor, warm page
  cache). The pass is tensor-major over a base and its experts, so each base tensor is read once for
  all of them; we report the cost per checkpoint of that pass and of a single expert-with-base pass.
- Functional signature vs one batched `torch.inference_mode()` forward pass of the probe set (the
  same batches, no hidden states kept); model loading is reported separately.
- Pairwise features on synthetic signatures (realistic shapes) for catalogs of 100 and 1000
  checkpoints, all unordered pairs.
Random-init Llamas (bfloat16 on disk, float32 in memory) of about 30M and 275M parameters; a
word-hash tokenizer stands in for a real one (the forward pass does not care what ids mean).
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from bench.bench_merge import llama_config, tensor_layout, write_random_checkpoint
from bench.report import write_section
from features import Signature, pairwise_features
from features.functional import functional_signature
from features.schema import DEFAULT_CONFIG, KINDS, QUANTILE_LEVELS
from features.signature import SignaturePart
from features.structural import allocate_samples, structural_signatures
from simmerge.checkpoint import Checkpoint

SIZES = {"30M": (512, 8, 8192), "275M": (1024, 18, 32000)}  # hidden, layers, vocab


class WordHashTokenizer:
    """Text → ids by hashing words: enough to drive a forward pass of a random-init model."""

    pad_token_id = 0

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, text: str, truncation: bool = True, max_length: int = 64) -> dict[str, list[int]]:
        ids = [1] + [2 + zlib.crc32(w.encode()) % (self.vocab - 2) for w in text.split()]
        return {"input_ids": ids[:max_length] if truncation else ids}


def probe_texts(n: int, tokens: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(5000)]
    return [" ".join(rng.choice(words, size=tokens - 1)) for _ in range(n)]


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


# ----------------------------------------------------------------------------- per-checkpoint cost


def make_family(work: Path, size: str, n_experts: int) -> tuple[Path, list[Path]]:
    hidden, layers, vocab = SIZES[size]
    config = llama_config(hidden, layers, vocab)
    layout = tensor_layout(config)
    base = work / size / "base"
    write_random_checkpoint(base, config, layout, seed=0, base=None)
    experts = [work / size / f"expert-{i}" for i in range(n_experts)]
    for i, path in enumerate(experts):
        write_random_checkpoint(path, config, layout, seed=i + 1, base=base)
    return base, experts


def read_all(checkpoint: Checkpoint) -> None:
    for name in checkpoint.names():
        checkpoint.read(name)


def pread_all(checkpoint: Checkpoint) -> None:
    """The hardware floor: every tensor's bytes preadv'd into one reused buffer (no allocation, no tensor)."""
    import os

    buffer = memoryview(bytearray(max(checkpoint.info(n).nbytes for n in checkpoint.names())))
    for name in checkpoint.names():
        info = checkpoint.info(name)
        fd = os.open(info.file, os.O_RDONLY)
        try:
            os.preadv(fd, [buffer[: info.nbytes]], info.start)
        finally:
            os.close(fd)


def interleaved_best(repeats: int, **fns) -> dict[str, float]:
    """Best time of each function over `repeats` rounds, the functions taking turns within a round, so a
    shared machine's drift (other tenants, memory bandwidth) touches them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: min(values) for name, values in times.items()}


def first_family_of_a_base(base: Checkpoint, experts: list[Checkpoint]) -> None:
    """A pass that draws the base layout's sampled coordinates, as the first family of a base in a
    process does (later families reuse them)."""
    from features.structural import clear_picks_cache

    clear_picks_cache()
    structural_signatures(base, experts, "b", DEFAULT_CONFIG)


def structural_cost(base_dir: Path, expert_dirs: list[Path], repeats: int) -> dict[str, float]:
    from features.structural import pass_workers

    base = Checkpoint.open(base_dir)
    experts = [Checkpoint.open(p) for p in expert_dirs]
    for ckpt in (base, *experts):
        read_all(ckpt)  # warm the page cache: the floors and the pass then read from memory alike
    best = interleaved_best(
        repeats,
        floor=lambda: read_all(experts[0]),
        pread=lambda: pread_all(experts[0]),
        family=lambda: structural_signatures(base, experts, "b", DEFAULT_CONFIG),
        first=lambda: first_family_of_a_base(base, experts),
        single=lambda: structural_signatures(base, experts[:1], "b", DEFAULT_CONFIG, include_base=False),
    )
    part = structural_signatures(base, experts[:1], "b", DEFAULT_CONFIG, include_base=False)[0]
    return {
        "params": sum(t.numel for t in base.tensors.values()),
        "weight_bytes": base.weight_bytes,
        "floor": best["floor"],
        "pread": best["pread"],
        "per_checkpoint": best["family"] / (len(experts) + 1),
        "first_per_checkpoint": best["first"] / (len(experts) + 1),
        "family_size": len(experts) + 1,
        "single": best["single"],
        "bytes": part.nbytes,
        "threads": pass_workers(),
    }


def functional_cost(base_dir: Path, size: str, args) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    vocab = SIZES[size][2]
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    model = model.to(args.device).eval()
    load = time.perf_counter() - started
    tokenizer = WordHashTokenizer(vocab)
    texts = probe_texts(args.probes, args.tokens)
    batches = [
        torch.tensor([tokenizer(t)["input_ids"] for t in texts[i : i + args.batch_size]])
        for i in range(0, len(texts), args.batch_size)
    ]

    @torch.inference_mode()
    def floor() -> None:
        for ids in batches:
            model(input_ids=ids.to(args.device), attention_mask=torch.ones_like(ids).to(args.device))

    def signature() -> SignaturePart:
        return functional_signature(model, tokenizer, texts, DEFAULT_CONFIG, args.batch_size, args.device)

    floor()  # first call pays one-off allocations
    floor_s, sig_s = [], []
    for _ in range(args.repeats):  # interleaved, so load changes on the shared machine hit both alike
        floor_s.append(best_of(1, floor))
        sig_s.append(best_of(1, signature))
    return {"load": load, "floor": min(floor_s), "signature": min(sig_s), "bytes": signature().nbytes}


# ----------------------------------------------------------------------------- pairwise throughput


def synthetic_signatures(
    m: int, layers: int = 19, probes: int = 64, n_tensors: int = 165, vocab: int = 32000, seed: int = 0
) -> list[Signature]:
    """Signatures with the shapes a 275M Llama and 64 probes give, and some shared structure."""
    rng = np.random.default_rng(seed)
    cfg = DEFAULT_CONFIG
    positions, k, width = cfg.positions, cfg.top_k, cfg.hidden_width
    candidates = rng.integers(0, vocab, size=(positions, 3 * k))
    base_logits = rng.normal(size=(positions, 3 * k)) * 2
    base_hidden = rng.normal(size=(layers, probes, width)).astype(np.float32)
    numel = rng.integers(1024, 4_000_000, size=n_tensors)
    counts = np.array(allocate_samples(numel.tolist(), cfg.sample_size, cfg.min_per_tensor))
    owner = np.repeat(np.arange(n_tensors), counts)
    directions = rng.normal(size=(4, cfg.sample_size)).astype(np.float32)
    sigs = []
    for i in range(m):
        logits = base_logits + rng.normal(size=base_logits.shape)
        order = np.argsort(-logits, axis=1)[:, :k]
        chosen = np.take_along_axis(logits, order, 1)
        norm = np.log(np.exp(logits).sum(1, keepdims=True) + 50.0)
        functional = {
            "positions": np.zeros((positions, 2), dtype=np.int64),
            "topk_ids": np.take_along_axis(candidates, order, 1).astype(np.int32),
            "topk_logp": (chosen - norm).astype(np.float32),
            "rest_logp": np.log(50.0 / np.exp(norm[:, 0])).astype(np.float32),
            "hidden": base_hidden + rng.normal(size=base_hidden.shape).astype(np.float32) * 0.5,
        }
        sample = (directions[i % 4] + rng.normal(size=cfg.sample_size)).astype(np.float32) * 1e-3
        quantiles = np.stack(
            [np.quantile(np.abs(sample[owner == t]), QUANTILE_LEVELS) for t in range(n_tensors)]
        ).astype(np.float32)
        structural = {
            "numel": numel,
            "counts": counts,
            "kinds": (np.arange(n_tensors) % len(KINDS)).astype(np.int8),
            "depths": (np.arange(n_tensors) % 3).astype(np.int8),
            "sq_norm": (numel * 1e-6).astype(np.float64),
            "base_sq_norm": numel.astype(np.float64) * 1e-2,
            "quantiles": quantiles,
            "sample": sample,
        }
        fmeta = {"token_key": "synthetic", "vocab_size": vocab}
        smeta = {"base_hash": "synthetic", "layout": "synthetic", "is_base": False}
        sigs.append(
            Signature(
                f"c{i}",
                f"c{i}",
                SignaturePart("functional", fmeta, functional),
                SignaturePart("structural", smeta, structural),
            )
        )
    return sigs


def pairwise_cost(m: int) -> dict[str, float]:
    sigs = synthetic_signatures(m)
    pairs = np.array([(i, j) for i in range(m) for j in range(i + 1, m)], dtype=np.int64)
    started = time.perf_counter()
    out = pairwise_features(sigs, pairs)
    elapsed = time.perf_counter() - started
    assert np.isfinite(out[:, :20]).all()
    return {"checkpoints": m, "pairs": len(pairs), "seconds": elapsed, "bytes": sigs[0].nbytes}


# ----------------------------------------------------------------------------- signal


def feature_signal(labels_path: Path, zoo: Path | None, work: Path) -> tuple[str, str]:
    """Spearman of each pair feature with the held-in score, per operator family, over zoo pairs.

    A pair's score for a family is its mean held-in score over that family's settings (slerp keeps
    both orders as separate pairs, since it is asymmetric). Returns (markdown body, zoo path).
    """
    import pandas as pd
    import pyarrow.parquet as pq
    from scipy.stats import spearmanr

    from features import compute_signatures, feature_names, load_signature

    table = pq.read_table(labels_path)
    meta = json.loads(table.schema.metadata[b"simmerge.labels"])
    zoo = Path(zoo or meta["zoo"])
    manifest = json.loads((zoo / "catalog.json").read_text())["checkpoints"]
    paths = {c["name"]: zoo / c["path"] for c in manifest}
    home = work / f"signal-home-{zoo.name}"
    compute_signatures(
        paths, {c["name"]: c.get("base") for c in manifest}, zoo / "probes.jsonl", home, progress=False
    )
    sigs = {n: load_signature(home, p, name=n, compute=False) for n, p in paths.items()}
    labels = table.to_pandas()
    labels = labels[(labels["kind"] == "pair") & labels["held_in_score"].notna()]
    scores = labels.groupby(["model_a", "model_b", "method"], as_index=False)["held_in_score"].mean()
    names = feature_names()
    methods = sorted(scores["method"].unique())
    rho = pd.DataFrame(index=names, columns=methods, dtype=float)
    counts = {}
    for method in methods:
        rows = scores[scores["method"] == method]
        features = pairwise_features(sigs, list(zip(rows["model_a"], rows["model_b"], strict=True)))
        counts[method] = len(rows)
        for j, name in enumerate(names):
            column = features[:, j]
            ok = np.isfinite(column)
            if ok.sum() >= 4 and np.ptp(column[ok]) > 0:
                rho.loc[name, method] = spearmanr(column[ok], rows["held_in_score"].to_numpy()[ok])[0]
    rho["mean |ρ|"] = rho[methods].abs().mean(axis=1)
    rho = rho.sort_values("mean |ρ|", ascending=False)
    header = "| feature | " + " | ".join(f"{m} (n={counts[m]})" for m in methods) + " | mean \\|ρ\\| |"
    lines = [
        f"Labels: `{labels_path}` ({len(labels)} pair rows, {scores[['model_a', 'model_b']].drop_duplicates().shape[0]} "
        f"ordered pairs) on zoo `{zoo}`. Spearman ρ between each feature and the pair's mean normalised held-in "
        "score per operator family (over that family's settings). Pairs share checkpoints, so rows are not "
        "independent: a first look, not a result.",
        "",
        header,
        "| --- " * (len(methods) + 2) + "|",
    ]
    for name, row in rho.iterrows():
        cells = " | ".join("—" if not np.isfinite(row[m]) else f"{row[m]:+.2f}" for m in methods)
        lines.append(f"| {name} | {cells} | {row['mean |ρ|']:.2f} |")
    return "\n".join(lines), str(zoo)


# ----------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path(".cache/bench-features"))
    parser.add_argument("--sizes", default="30M,275M")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--catalogs", default="100,1000")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="Also write the raw figures here.")
    parser.add_argument("--no-report", action="store_true", help="Do not touch BENCHMARKS.md.")
    parser.add_argument(
        "--signal", type=Path, default=None, help="labels.parquet: only the feature-signal table."
    )
    parser.add_argument(
        "--zoo", type=Path, default=None, help="The zoo of --signal [default: from its metadata]."
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.signal is not None:
        body, _ = feature_signal(args.signal, args.zoo, args.work)
        print(body)
        if not args.no_report:
            command = f"python -m bench.bench_features --signal {args.signal}"
            write_section("feature-signal", "Feature signal: Spearman with held-in score", command, body)
        return
    results: dict[str, object] = {"threads": torch.get_num_threads(), "device": args.device, "sizes": {}}
    for size in [s for s in args.sizes.split(",") if s]:
        base, experts = make_family(args.work, size, args.experts)
        results["sizes"][size] = {
            "structural": structural_cost(base, experts, args.repeats),
            "functional": functional_cost(base, size, args),
        }
        print(json.dumps({size: results["sizes"][size]}, indent=1), flush=True)
    results["pairwise"] = [pairwise_cost(int(m)) for m in args.catalogs.split(",") if m]
    print(json.dumps(results["pairwise"], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(render(results, args))
    if not args.no_report:
        write_section(
            "features", "Signatures and pairwise features", "make bench-features", render(results, args)
        )


def render(results: dict, args) -> str:
    lines = [
        f"Probe set: {args.probes} probes × {args.tokens} tokens, batch {args.batch_size}, device "
        f"{results['device']}, {results['threads']} torch threads; signature settings {DEFAULT_CONFIG}. "
        "Times are the best of "
        f"{args.repeats} rounds (each round runs every structural measurement in turn), warm page cache.",
        "",
        "| model | params | structural / ckpt (family of n): first of a base / later | single expert+base "
        "| floor: one read | ratio: first / later | bare pread | ratio: first / later | functional "
        "| floor: forward | ratio | model load | signature bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, r in results["sizes"].items():
        s, f = r["structural"], r["functional"]
        lines.append(
            f"| {size} | {s['params'] / 1e6:.0f}M "
            f"| {s['first_per_checkpoint']:.3f} s / {s['per_checkpoint']:.3f} s (n={s['family_size']}) "
            f"| {s['single']:.3f} s | {s['floor']:.3f} s "
            f"| **{s['first_per_checkpoint'] / s['floor']:.2f}×** / {s['per_checkpoint'] / s['floor']:.2f}× "
            f"| {s['pread']:.3f} s "
            f"| {s['first_per_checkpoint'] / s['pread']:.2f}× / {s['per_checkpoint'] / s['pread']:.2f}× "
            f"| {f['signature']:.3f} s | {f['floor']:.3f} s | {f['signature'] / f['floor']:.2f}× "
            f"| {f['load']:.2f} s | {s['bytes'] + f['bytes']:,} |"
        )
    lines += [
        "",
        "Structural: *per ckpt* is one tensor-major pass over a base and its experts (each base chunk read "
        "once for all of them) divided by the number of checkpoints signed. *First of a base* includes "
        "drawing the base layout's seeded sample coordinates (two seeded draws per tensor), which a process "
        "keeps for later families of the same base (*later*); the goal is judged on *first*. *Single* "
        "signs one expert "
        f"with its base (two reads). The pass streams tensors on {_pass_threads(results)} threads (one "
        "tensor per thread at a time; the result does not depend on the count). *Floor: one read* is "
        "`Checkpoint.read` of every tensor of one checkpoint from the page cache, what loading the "
        "weights costs (goal ≤ 1.5×); *bare pread* copies the same bytes into one reused buffer without "
        "making tensors, the machine's floor. Per element the pass also widens bf16 to float32 (in "
        "registers), subtracts the base and accumulates, in one compiled call per chunk. Functional: the signature's forward pass keeps hidden states and takes "
        "top-k at 64 positions; the floor is the same batched `inference_mode` forward without them. "
        "Signature bytes grow with depth (layers, tensors), not width.",
        "",
        "Pairwise features (all unordered pairs, one `pairwise_features` call, synthetic signatures "
        "shaped like the 275M model's):",
        "",
        "| checkpoints | pairs | seconds | pairs / s |",
        "| --- | --- | --- | --- |",
    ]
    for p in results["pairwise"]:
        lines.append(
            f"| {p['checkpoints']} | {p['pairs']:,} | {p['seconds']:.2f} | {p['pairs'] / p['seconds']:,.0f} |"
        )
    return "\n".join(lines)


def _pass_threads(results: dict) -> int:
    return max((r["structural"]["threads"] for r in results["sizes"].values()), default=1)


if __name__ == "__main__":
    main()
