"""Signatures and pairwise features: known answers, estimates against exact statistics, invariances."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from features import (
    Signature,
    SignatureConfig,
    compute_signatures,
    feature_names,
    load_signature,
    load_signatures,
    pair_features,
    pairwise_features,
)
from features.functional import checkpoint_functional
from features.pairwise import _FunctionalStack, _Pairs
from features.schema import MASK_DENSITIES
from features.signature import SignaturePart
from features.structural import allocate_samples, structural_signatures
from simmerge.checkpoint import Checkpoint
from simmerge.errors import SimMergeError

SMALL = SignatureConfig(sample_size=2048, quantile_sample=512)
PROBES = ["copy : a b c =", "reverse : d e f g =", "shift : a a b =", "sort : c b a d e =", "copy : e"]


def write_variant(base: Path, out: Path, change: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    """A copy of `base` (config, tokenizer) whose tensors are `change(name, tensor)`."""
    shutil.copytree(base, out)
    tensors = load_file(base / "model.safetensors")
    save_file(
        {n: change(n, t).contiguous() for n, t in tensors.items()},
        out / "model.safetensors",
        {"format": "pt"},
    )
    return out


def noise(name: str, shape, seed: int, scale: float = 0.02) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 7919 + sum(map(ord, name)))
    return torch.randn(shape, generator=generator) * scale


@pytest.fixture
def family(tiny_llama_factory, tmp_path):
    """A base, an expert, a correlated expert (τ_c = 0.6 τ + 0.8 noise) and the negated expert (base − τ)."""
    base = tiny_llama_factory("base", seed=0, tokenizer=True, hidden=64)
    expert = write_variant(base, tmp_path / "expert", lambda n, t: t + noise(n, t.shape, 1))
    related = write_variant(
        base, tmp_path / "related", lambda n, t: t + 0.6 * noise(n, t.shape, 1) + 0.8 * noise(n, t.shape, 2)
    )
    negated = write_variant(base, tmp_path / "negated", lambda n, t: t - noise(n, t.shape, 1))
    return {"base": base, "expert": expert, "related": related, "negated": negated}


def signatures(paths: dict[str, Path], config: SignatureConfig = SMALL) -> dict[str, Signature]:
    base = Checkpoint.open(paths["base"])
    names = [n for n in paths if n != "base"]
    parts = structural_signatures(base, [Checkpoint.open(paths[n]) for n in names], "base", config)
    structural = dict(zip([*names, "base"], parts, strict=True))
    return {
        n: Signature(n, n, checkpoint_functional(p, PROBES, config), structural[n]) for n, p in paths.items()
    }


def test_feature_names_are_unique_and_match_the_columns(family):
    sigs = signatures({"base": family["base"], "expert": family["expert"]})
    names = feature_names()
    assert len(set(names)) == len(names)
    assert pairwise_features(sigs, [("expert", "base")]).shape == (1, len(names))


def test_a_checkpoint_against_itself(family):
    sigs = signatures(family)
    same = pair_features(sigs["expert"], sigs["expert"])
    for name in ("kl_ab_mean", "kl_ba_p90", "js_mean", "tv_dist", "log_norm_ratio"):
        assert same[name] == pytest.approx(0.0, abs=1e-6), name
    for name in (
        "top1_agree",
        "hidden_cos_mean",
        "cka_min",
        "tv_cos",
        "tv_cos_mlp",
        "sign_agree",
        "mask_overlap_50",
    ):
        assert same[name] == pytest.approx(1.0, abs=1e-5), name


def test_negated_task_vector_has_cosine_minus_one(family):
    sigs = signatures(family)
    opposite = pair_features(sigs["expert"], sigs["negated"])
    assert opposite["tv_cos"] == pytest.approx(-1.0, abs=1e-5)
    assert opposite["tv_cos_attention"] == pytest.approx(-1.0, abs=1e-5)
    assert opposite["sign_agree"] == pytest.approx(0.0, abs=1e-3)
    assert opposite["mask_overlap_20"] == pytest.approx(1.0, abs=1e-3)  # same magnitudes, same masks
    assert opposite["tv_dist"] == pytest.approx(2 * opposite["tv_norm_a"], rel=1e-5)
    related = pair_features(sigs["expert"], sigs["related"])
    assert 0.4 < related["tv_cos"] < 0.8  # 0.6 / √(0.36 + 0.64) in expectation


def exact_statistics(base: Path, a: Path, b: Path) -> dict[str, float]:
    """Full-tensor statistics the sampled features estimate (per-tensor top-k masks, like TIES)."""
    tb, ta, tc = (load_file(p / "model.safetensors") for p in (base, a, b))
    dot = na = nb = agree = total = 0.0
    inter = {d: 0.0 for d in MASK_DENSITIES}
    size_a = {d: 0.0 for d in MASK_DENSITIES}
    size_b = {d: 0.0 for d in MASK_DENSITIES}
    for name, base_tensor in tb.items():
        x = (ta[name] - base_tensor).flatten().double()
        y = (tc[name] - base_tensor).flatten().double()
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
        agree += float((torch.sign(x) == torch.sign(y)).sum())
        total += x.numel()
        for d in MASK_DENSITIES:
            mx = x.abs() >= torch.quantile(x.abs(), 1 - d)
            my = y.abs() >= torch.quantile(y.abs(), 1 - d)
            inter[d] += float((mx & my).sum())
            size_a[d] += float(mx.sum())
            size_b[d] += float(my.sum())
    out = {"tv_cos": dot / np.sqrt(na * nb), "sign_agree": agree / total, "tv_norm_a": np.sqrt(na)}
    out["tv_dist"] = np.sqrt(na + nb - 2 * dot)
    for d in MASK_DENSITIES:
        out[f"mask_overlap_{round(d * 100)}"] = inter[d] / np.sqrt(size_a[d] * size_b[d])
    return out


# Stated tolerances for sampled estimates (≈ 4 standard errors at the sample sizes used).
TOLERANCE = {"tv_cos": 0.06, "sign_agree": 0.03, "tv_dist": 0.05, "mask_overlap": 0.06}


def assert_close_to_exact(estimated: dict[str, float], exact: dict[str, float]) -> None:
    assert estimated["tv_norm_a"] == pytest.approx(exact["tv_norm_a"], rel=1e-4)  # norms are exact
    assert abs(estimated["tv_cos"] - exact["tv_cos"]) < TOLERANCE["tv_cos"]
    assert abs(estimated["sign_agree"] - exact["sign_agree"]) < TOLERANCE["sign_agree"]
    assert estimated["tv_dist"] == pytest.approx(exact["tv_dist"], rel=TOLERANCE["tv_dist"])
    for d in MASK_DENSITIES:
        name = f"mask_overlap_{round(d * 100)}"
        assert abs(estimated[name] - exact[name]) < TOLERANCE["mask_overlap"], name


def test_sampled_estimates_match_exact_statistics_on_tiny_llamas(family):
    config = SignatureConfig(sample_size=4096, quantile_sample=1024)
    parts = structural_signatures(
        Checkpoint.open(family["base"]),
        [Checkpoint.open(family["expert"]), Checkpoint.open(family["related"])],
        "base",
        config,
    )
    assert parts[0]["counts"].sum() == 4096 < parts[0]["numel"].sum()  # really a sample
    a, b = (Signature(n, n, None, p) for n, p in zip("ab", parts[:2], strict=True))
    assert_close_to_exact(
        pair_features(a, b), exact_statistics(family["base"], family["expert"], family["related"])
    )


def test_structural_pass_is_the_same_whatever_the_number_of_threads(family):
    def sign(workers: int):
        experts = [Checkpoint.open(family["expert"]), Checkpoint.open(family["related"])]
        return structural_signatures(Checkpoint.open(family["base"]), experts, "base", SMALL, workers=workers)

    one, three = sign(1), sign(3)
    assert [p.meta for p in one] == [p.meta for p in three]
    for a, b in zip(one, three, strict=True):
        assert a.arrays.keys() == b.arrays.keys()
        for key in a.arrays:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert one[0]["sq_norm"].sum() > 0 and not one[-1]["sample"].any()  # expert, then the base itself


def test_magnitude_quantiles_are_numpys_over_the_sampled_coordinates(family):
    """End to end: the kernel's |τ| at the quantile coordinates, and its sorted-row quantiles, are
    exactly what NumPy gives on the tensors loaded whole."""
    from features.schema import QUANTILE_LEVELS
    from features.structural import Layout, LayoutPicks, clear_picks_cache

    base, expert = Checkpoint.open(family["base"]), Checkpoint.open(family["expert"])
    clear_picks_cache()
    part = structural_signatures(base, [expert], "base", SMALL, include_base=False)[0]
    layout = Layout.of(base, SMALL)
    picks = LayoutPicks.of(layout, SMALL)
    tb, te = (
        load_file(family["base"] / "model.safetensors"),
        load_file(family["expert"] / "model.safetensors"),
    )
    for i, name in enumerate(layout.names):
        tau = (te[name].float() - tb[name].float()).reshape(-1).numpy()
        expected = np.quantile(np.abs(tau[picks[i].qindices]), QUANTILE_LEVELS).astype(np.float32)
        np.testing.assert_array_equal(part["quantiles"][i], expected, err_msg=name)
    again = structural_signatures(base, [expert], "base", SMALL, include_base=False)[0]  # coordinates kept
    for key in part.arrays:
        np.testing.assert_array_equal(part[key], again[key], err_msg=key)


def test_sorted_row_quantiles_match_numpy_exactly():
    from features.kernels import sorted_row_quantiles
    from features.schema import QUANTILE_LEVELS

    levels = np.array(QUANTILE_LEVELS)
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 7, 100, 2048, 2049]:
        rows = (np.abs(rng.standard_normal((3, n))) * 10 ** rng.uniform(-6, 2)).astype(np.float32)
        rows[1] = np.round(rows[1], 1)  # ties
        rows[2, 0] = np.nan
        out = np.zeros((3, len(levels)), dtype=np.float32)
        sorted_row_quantiles(np.sort(rows, axis=1), levels, out)
        expected = np.quantile(rows, levels, axis=1).T.astype(np.float32)
        np.testing.assert_array_equal(out, expected, err_msg=f"n={n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_streaming_matches_whole_tensors(tiny_llama_factory, tmp_path, monkeypatch, dtype):
    import features.structural

    base = tiny_llama_factory("b", seed=0, dtype=dtype, hidden=64)
    expert = write_variant(base, tmp_path / "e", lambda n, t: (t.float() + noise(n, t.shape, 3)).to(dtype))
    read = lambda: structural_signatures(Checkpoint.open(base), [Checkpoint.open(expert)], "b", SMALL)[0]  # noqa: E731
    whole = read()
    monkeypatch.setattr(features.structural, "CHUNK_ELEMENTS", 1000)  # large tensors span many chunks
    assert (
        len(list(features.structural.read_chunks([Checkpoint.open(base)], "model.embed_tokens.weight"))) > 1
    )
    chunked = read()
    np.testing.assert_array_equal(whole["sample"], chunked["sample"])
    np.testing.assert_array_equal(whole["quantiles"], chunked["quantiles"])
    np.testing.assert_allclose(whole["sq_norm"], chunked["sq_norm"], rtol=1e-5)
    tb, te = load_file(base / "model.safetensors"), load_file(expert / "model.safetensors")
    names = Checkpoint.open(base).names()
    exact = [float(((te[n].float() - tb[n].float()) ** 2).sum()) for n in names]
    np.testing.assert_allclose(chunked["sq_norm"], exact, rtol=1e-4)


def test_sampled_estimates_match_exact_statistics_on_the_ci_zoo(ci_zoo):
    manifest = json.loads((ci_zoo / "catalog.json").read_text())
    rows = {r["name"]: ci_zoo / r["path"] for r in manifest["checkpoints"]}
    experts = [n for n in rows if n.startswith("a-") and n != "a-base"][:2]
    parts = structural_signatures(
        Checkpoint.open(rows["a-base"]),
        [Checkpoint.open(rows[n]) for n in experts],
        "a-base",
        SignatureConfig(),
    )
    assert parts[0]["counts"].sum() < parts[0]["numel"].sum()
    a, b = (Signature(n, n, None, p) for n, p in zip(experts, parts[:2], strict=True))
    assert_close_to_exact(
        pair_features(a, b), exact_statistics(rows["a-base"], rows[experts[0]], rows[experts[1]])
    )


def test_functional_part_does_not_depend_on_batch_size(family):
    parts = [checkpoint_functional(family["expert"], PROBES, SMALL, batch_size=size) for size in (1, 2, 16)]
    for other in parts[1:]:
        for key in ("topk_ids", "positions"):
            np.testing.assert_array_equal(parts[0][key], other[key])
        for key in ("topk_logp", "rest_logp", "hidden"):
            np.testing.assert_allclose(parts[0][key], other[key], atol=1e-5, rtol=1e-5)


def test_signature_size_does_not_depend_on_model_width(tiny_llama_factory):
    config = SignatureConfig(sample_size=2048, hidden_width=48)
    sizes = []
    for hidden in (32, 96):  # below the projection width (padded) and above it (projected)
        base = tiny_llama_factory(f"w{hidden}", seed=0, tokenizer=True, hidden=hidden)
        structural = structural_signatures(Checkpoint.open(base), [], "b", config)[0]
        functional = checkpoint_functional(base, PROBES, config)
        assert functional["hidden"].shape[-1] == 48
        sizes.append((structural.nbytes, functional.nbytes))
    assert sizes[0] == sizes[1]


def test_compact_divergences_match_a_dense_reference():
    """KL/JS from top-k + rest equal KL/JS of dense distributions with the rest spread evenly."""
    rng = np.random.default_rng(0)
    vocab, k, positions = 12, 3, 6
    dense, parts = [], []
    for _ in range(2):
        logits = rng.normal(size=(positions, vocab)) * 2
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        order = np.argsort(-logp, axis=1)[:, :k]
        top = np.take_along_axis(logp, order, 1)
        rest = np.log1p(-np.exp(top).sum(1))
        spread = np.full((positions, vocab), 0.0)
        spread[:] = (np.exp(rest) / (vocab - k))[:, None]
        np.put_along_axis(spread, order, np.exp(top), 1)
        dense.append(spread)
        arrays = {
            "topk_ids": order.astype(np.int32),
            "topk_logp": top.astype(np.float32),
            "rest_logp": rest.astype(np.float32),
            "hidden": rng.normal(size=(2, 3, 4)).astype(np.float32),
        }
        parts.append(Signature("x", "x", SignaturePart("functional", {"vocab_size": vocab}, arrays)))
    p, q = dense
    kl_ab = (p * np.log(p / q)).sum(1)
    kl_ba = (q * np.log(q / p)).sum(1)
    m = (p + q) / 2
    js = 0.5 * (p * np.log(p / m)).sum(1) + 0.5 * (q * np.log(q / m)).sum(1)
    got = _FunctionalStack.of(parts).features(_Pairs(np.array([0]), np.array([1]), 2))[0]
    expected = [kl_ab.mean(), np.median(kl_ab), np.quantile(kl_ab, 0.9), kl_ba.mean(), np.median(kl_ba)]
    np.testing.assert_allclose(got[:5], expected, rtol=1e-4)
    np.testing.assert_allclose(got[6:9], [js.mean(), np.median(js), np.quantile(js, 0.9)], rtol=1e-4)


def test_batch_api_agrees_with_the_pair_api_on_dense_and_sparse_pair_sets(family):
    sigs = signatures(family)
    names = list(sigs)
    ordered = [sigs[n] for n in names]
    every = np.array([(i, j) for i in range(len(names)) for j in range(len(names))])  # Gram path
    dense = pairwise_features(ordered, every)
    sparse = pairwise_features(ordered, every[[1, 6]])  # row-by-row path
    np.testing.assert_allclose(sparse, dense[[1, 6]], rtol=1e-5, atol=1e-6)
    one = pair_features(sigs[names[0]], sigs[names[1]])
    np.testing.assert_allclose(list(one.values()), dense[1], rtol=1e-5, atol=1e-6)
    by_name = pairwise_features(sigs, [(names[0], names[1])])
    np.testing.assert_allclose(by_name[0], dense[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(SimMergeError, match="nope"):
        pairwise_features(sigs, [("nope", names[0])])


def test_pairs_across_bases_get_nan_structural_features(family, tiny_llama_factory):
    sigs = signatures(family)
    other = tiny_llama_factory("other", seed=5, tokenizer=True, hidden=64)
    part = structural_signatures(Checkpoint.open(other), [], "other-base", SMALL)[0]
    stranger = Signature("other", "o", checkpoint_functional(other, PROBES, SMALL), part)
    row = pair_features(sigs["expert"], stranger)
    assert np.isnan(row["tv_cos"]) and not np.isnan(row["kl_ab_mean"])


def test_sample_allocation_is_exact_and_covers_every_tensor():
    counts = allocate_samples([10, 5000, 3, 100000, 64], total=1000, minimum=8)
    assert sum(counts) == 1000
    assert counts[0] == 8 and counts[2] == 3 and counts[3] > counts[1]
    assert allocate_samples([5, 6], total=100, minimum=8) == [5, 6]


def test_empty_probe_file_is_rejected_by_name(family, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SimMergeError, match=r"empty\.jsonl"):
        compute_signatures({"base": family["base"]}, probes=empty, home=tmp_path / "home", progress=False)


def test_second_run_reads_only_what_changed(family, tmp_path, monkeypatch):
    import features.functional
    import features.structural

    reads = {"tensors": 0, "forward": 0}
    read_chunks, forward = features.structural.read_chunks, features.functional.checkpoint_functional

    def counting_read(*args, **kwargs):
        reads["tensors"] += 1
        return read_chunks(*args, **kwargs)

    def counting_forward(*args, **kwargs):
        reads["forward"] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(features.structural, "read_chunks", counting_read)
    monkeypatch.setattr(features.functional, "checkpoint_functional", counting_forward)
    home = tmp_path / "home"
    paths = {"base": family["base"], "expert": family["expert"], "related": family["related"]}
    bases = {"base": None, "expert": "base", "related": "base"}
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROBES))
    reported: list[float] = []
    first = compute_signatures(paths, bases, probes, home, progress=lambda f, _msg: reported.append(f))
    assert (first["computed_functional"], first["computed_structural"]) == (3, 3)
    assert len(reported) == 6 and reported == sorted(reported) and reported[-1] == 1.0
    assert reads["forward"] == 3 and reads["tensors"] > 0
    reads.update(tensors=0, forward=0)
    second = compute_signatures(paths, bases, probes, home, progress=False)
    assert second["cached"] == 6 and reads == {"tensors": 0, "forward": 0}
    probes.write_text(json.dumps({"text": "copy : b a ="}) + "\n")  # new probes: functional parts only
    third = compute_signatures(paths, bases, probes, home, progress=False)
    assert (third["computed_functional"], third["computed_structural"]) == (3, 0)
    assert reads == {"tensors": 0, "forward": 3}
    loaded = load_signature(home, family["expert"], compute=False)
    assert loaded.structural is not None and loaded.functional.meta["probe_hash"] == third["probe_hash"]
    many = load_signatures(home, paths, compute=False)
    assert set(many) == set(paths) and reads == {"tensors": 0, "forward": 3}
    np.testing.assert_array_equal(many["expert"].structural["sample"], loaded.structural["sample"])


def test_cli_fills_the_cache_for_a_zoo(ci_zoo, tmp_path):
    from click.testing import CliRunner

    from simmerge.cli import cli

    home = tmp_path / "home"
    runner = CliRunner()
    first = runner.invoke(
        cli, ["--home", str(home), "features", "--zoo", str(ci_zoo), "--no-progress", "--json"]
    )
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output)
    n = summary["checkpoints"]
    assert summary["computed_functional"] == n and summary["computed_structural"] == n
    again = runner.invoke(
        cli, ["--home", str(home), "features", "--zoo", str(ci_zoo), "--no-progress", "--json"]
    )
    assert json.loads(again.output)["cached"] == 2 * n
    from simmerge.catalog import Catalog

    with Catalog.open(home) as catalog:  # the home catalog path: same checkpoints, all cached
        catalog.import_zoo(ci_zoo)
    from_catalog = runner.invoke(cli, ["--home", str(home), "features", "--no-progress", "--json"])
    assert from_catalog.exit_code == 0, from_catalog.output
    assert json.loads(from_catalog.output)["cached"] == 2 * n
    missing = runner.invoke(cli, ["--home", str(tmp_path / "none"), "features", "--no-progress"])
    assert isinstance(missing.exception, SimMergeError) and "no catalog" in str(missing.exception)
