"""`make bench-merge`: SimMerge vs mergekit on the same inputs, in the same run.

Merges K = 2 and 4 experts of a random-init Llama of about 300M parameters in bfloat16 with ties
and linear, once through `simmerge merge` and once through `mergekit-yaml`, each in its own
process so wall time and peak RSS (from `wait4`) are the whole command's. Floors are measured too:
interpreter start-up plus imports, a page-cache read of the inputs, and writing the output bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.report import write_section
from simmerge.checkpoint import Checkpoint
from simmerge.writer import OutputTensor, ShardedSafetensorsWriter, staged_directory

BIN = Path(sys.executable).parent


@dataclass
class Run:
    wall_s: float
    peak_rss_mb: float


def llama_config(hidden: int, layers: int, vocab: int) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    return config.to_dict()


def tensor_layout(config: dict) -> list[OutputTensor]:
    """The tensor names and shapes of a Llama, without instantiating one (300M random inits are slow)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    return [OutputTensor(n, torch.bfloat16, tuple(p.shape)) for n, p in model.state_dict().items()]


def write_random_checkpoint(
    path: Path, config: dict, layout: list[OutputTensor], seed: int, base: Path | None
):
    """A base (seeded noise) or an expert (base + seeded small task vector), streamed to disk."""
    if path.exists():
        return
    generator = torch.Generator().manual_seed(seed)
    base_ckpt = Checkpoint.open(base) if base else None
    with staged_directory(path) as staging:
        writer = ShardedSafetensorsWriter(staging, layout, 5 * 10**9)
        for spec in layout:
            noise = torch.randn(spec.shape, generator=generator) * (0.002 if base_ckpt else 0.02)
            value = base_ckpt.read(spec.name).float() + noise if base_ckpt else noise
            writer.write(spec.name, value.to(torch.bfloat16))
        writer.close()
        (staging / "config.json").write_text(json.dumps(config, indent=2))


def run_measured(argv: list[str]) -> Run:
    """Wall time of the whole command, and its own peak RSS (see bench/peak_rss.py for why)."""
    with tempfile.NamedTemporaryFile() as peak_file:
        wrapped = [sys.executable, "-m", "bench.peak_rss", peak_file.name, *argv]
        started = time.perf_counter()
        proc = subprocess.run(wrapped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {proc.stderr.decode()[-2000:]}")
        return Run(wall, int(Path(peak_file.name).read_text()) / 2**20)


def work_script(work: Path, code: str) -> Path:
    path = work / f"floor_{abs(hash(code))}.py"
    path.write_text(code + "\n")
    return path


def plan_yaml(method: str, base: Path, experts: list[Path]) -> str:
    models = "\n".join(
        f"  - model: {e}\n    parameters: {{weight: 1.0{', density: 0.5' if method == 'ties' else ''}}}"
        for e in experts
    )
    base_line = "" if method == "linear" else f"base_model: {base}\n"  # linear averages the experts alone
    return f"merge_method: {method}\n{base_line}models:\n{models}\ndtype: bfloat16\n"


def read_floor(paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        for file in path.glob("*.safetensors"):
            with file.open("rb") as handle:
                while handle.readinto(bytearray(64 * 2**20)):
                    pass
    return time.perf_counter() - started


def write_floor(directory: Path, nbytes: int) -> float:
    block = os.urandom(64 * 2**20)
    started = time.perf_counter()
    with (directory / "floor.bin").open("wb") as handle:
        for _ in range(max(1, nbytes // len(block))):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - started
    (directory / "floor.bin").unlink()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path(".cache/bench-merge"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ks", default="2,4")
    parser.add_argument("--methods", default="linear,ties")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    config = llama_config(args.hidden, args.layers, args.vocab)
    layout = tensor_layout(config)
    params = sum(t.nbytes for t in layout) // 2
    ks = [int(k) for k in args.ks.split(",")]
    base = args.work / "base"
    write_random_checkpoint(base, config, layout, 0, None)
    experts = [args.work / f"expert{i}" for i in range(max(ks))]
    for i, path in enumerate(experts):
        write_random_checkpoint(path, config, layout, i + 1, base)
    ckpt_bytes = Checkpoint.open(base).weight_bytes

    start_floor = run_measured([str(work_script(args.work, "import simmerge.engine, simmerge.cli_merge"))])
    mk_start_floor = run_measured([str(work_script(args.work, "import mergekit.merge, mergekit.config"))])
    rows = []
    for k in ks:
        write_s = write_floor(args.work, ckpt_bytes)
        for method in args.methods.split(","):
            inputs = experts[:k] if method == "linear" else [base, *experts[:k]]
            read_s = read_floor(inputs)
            config_file = args.work / f"{method}-{k}.yaml"
            config_file.write_text(plan_yaml(method, base, experts[:k]))
            results = {}
            for tool, argv in {
                "simmerge": [str(BIN / "simmerge"), "merge", "--config", str(config_file), "--no-progress"],
                "mergekit": [str(BIN / "mergekit-yaml"), str(config_file), "--quiet"],
            }.items():
                out = args.work / f"out-{tool}-{method}-{k}"
                shutil.rmtree(out, ignore_errors=True)
                argv = [*argv, "--out", str(out)] if tool == "simmerge" else [*argv[:2], str(out), *argv[2:]]
                results[tool] = run_measured(argv)
                shutil.rmtree(out, ignore_errors=True)
            sm, mk = results["simmerge"], results["mergekit"]
            moved = ckpt_bytes * (len(inputs) + 1)
            rows.append(
                f"| {method} | {k} | {sm.wall_s:.2f} | {mk.wall_s:.2f} | **{sm.wall_s / mk.wall_s:.2f}×** "
                f"| {sm.peak_rss_mb:.0f} | {mk.peak_rss_mb:.0f} | **{sm.peak_rss_mb / mk.peak_rss_mb:.2f}×** "
                f"| {moved / sm.wall_s / 1e6:.0f} | {moved / mk.wall_s / 1e6:.0f} | {read_s:.2f} | {write_s:.2f} |"
            )
            print(rows[-1], flush=True)
    body = (
        f"Random-init Llama, {params / 1e6:.0f}M parameters, bfloat16 ({ckpt_bytes / 1e6:.0f} MB per checkpoint); "
        f"K experts (plus the base for ties) as inputs; ties density 0.5, weights 1.0; each tool run as its own process "
        f"(wall time and peak RSS of that process, from `wait4`). Throughput = (inputs read + output written) / wall.\n\n"
        "| method | K | SimMerge s | mergekit s | time ratio | SimMerge peak MB | mergekit peak MB | memory ratio "
        "| SimMerge MB/s | mergekit MB/s | floor: read inputs s | floor: write output s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Floors: interpreter start-up + imports {start_floor.wall_s:.2f} s / {start_floor.peak_rss_mb:.0f} MB "
        f"(SimMerge), {mk_start_floor.wall_s:.2f} s / {mk_start_floor.peak_rss_mb:.0f} MB (mergekit); the read floor "
        "is a page-cache read of every input file, the write floor writing the output's bytes with fsync.\n"
        "Goal: time ratio < 0.7 and memory ratio < 0.5. No GPU was lent to this session, so there are no "
        "`--device cuda` figures yet."
    )
    write_section("merge", "Merge throughput and memory: SimMerge vs mergekit", "make bench-merge", body)


if __name__ == "__main__":
    main()
