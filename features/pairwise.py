"""Pairwise features from two signatures only, vectorised over many pairs.

Signatures are stacked into arrays once per call; every bilinear statistic (task-vector dot products,
sign and mask agreement, hidden-state cosine and CKA) is a dot product between stacked rows, computed
either as blocks of a Gram matrix (dense pair sets: matrix products) or row by row (sparse pair sets).
Next-token divergences work on the compact top-k + rest form: a token outside a model's top-k gets an
equal share of that model's remaining mass, which makes both sides proper distributions over the same
outcomes, so KL and Jensen–Shannon are exact for that pair of compact distributions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from threadpoolctl import threadpool_limits

from features.schema import DEPTHS, KINDS, MASK_DENSITIES, QUANTILE_LEVELS, depth_thirds, feature_names
from features.signature import Signature
from simmerge.errors import SimMergeError

CHUNK_PAIRS = 2048  # pairs per chunk for divergences (bounds memory at ~100 MB)
BLAS_THREADS = 1
_MIN_LOG = -80.0  # log-mass floor: a model that puts no mass outside its top-k still gets a finite log


class _Pairs:
    """Ordered pairs (a, b) of rows, planned once so that many bilinear statistics reuse the plan.

    Dense pair sets (most of the m × m grid) are served by blocks of a Gram matrix (matrix products);
    sparse ones row by row.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, m: int) -> None:
        self.a, self.b, self.m = a, b, m
        self.dense = len(a) * 16 >= m * m
        self.order = np.argsort(a, kind="stable") if self.dense else np.arange(len(a))
        self.sorted_a = a[self.order]
        self.block = max(1, min(m, 2**24 // max(m, 1)))  # Gram rows per block: ≤ 16M entries
        self.blocks = self._blocks(self.block)

    def _blocks(self, rows: int) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(first row, pair selection, their rows within the block, their columns) per block of a."""
        blocks = []
        for start in range(0, self.m, rows) if self.dense else ():
            lo, hi = np.searchsorted(self.sorted_a, [start, start + rows])
            if lo < hi:
                sel = self.order[lo:hi]
                blocks.append((start, sel, self.a[sel] - start, self.b[sel]))
        return blocks

    def chunks(self, max_pairs: int):
        """Yield (selection, dot) over chunks of about `max_pairs` pairs; `dot(x, y)` gives
        Σ_j x[a, j] · y[b, j] for the selected pairs, from a Gram block when the set is dense."""
        if self.dense:
            rows = max(1, min(self.m, max_pairs // max(1, self.m)))
            for start, sel, r, c in self._blocks(rows):
                yield (
                    sel,
                    lambda x, y, start=start, r=r, c=c, rows=rows: (x[start : start + rows] @ y.T)[r, c],
                )
        else:
            for s in range(0, len(self.a), max_pairs):
                sel = np.arange(s, min(s + max_pairs, len(self.a)))
                yield sel, lambda x, y, sel=sel: np.einsum("ij,ij->i", x[self.a[sel]], y[self.b[sel]])

    def __len__(self) -> int:
        return len(self.a)

    def dot(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """Σ_j x[a, j] · y[b, j] for every pair (y defaults to x)."""
        y = x if y is None else y
        out = np.empty(len(self.a), dtype=np.float64)
        if self.dense:
            for start, sel, rows, cols in self.blocks:
                out[sel] = (x[start : start + self.block] @ y.T)[rows, cols]
        else:
            step = max(1, 2**23 // max(1, x.shape[1]))
            for s in range(0, len(self.a), step):
                out[s : s + step] = np.einsum("ij,ij->i", x[self.a[s : s + step]], y[self.b[s : s + step]])
        return out


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _depth_summary(per_layer: np.ndarray) -> np.ndarray:
    """(n, L) → (n, 5): means over the first/middle/last third of layers (NaN if empty), mean, min."""
    thirds = depth_thirds(per_layer.shape[1])
    parts = [
        per_layer[:, thirds == t].mean(1) if (thirds == t).any() else np.full(len(per_layer), np.nan)
        for t in range(len(DEPTHS))
    ]
    return np.stack([*parts, per_layer.mean(1), per_layer.min(1)], axis=1)


# ----------------------------------------------------------------------------- functional


@dataclass
class _FunctionalStack:
    """Next-token distributions on a dense union of outcomes, and hidden-state rows.

    For each position the outcomes are every token some stacked signature has in its top-k (a segment
    of columns) plus one pooled outcome for all other tokens. Each signature gives its top-k tokens
    their log-probs and every other token its per-token rest share, so the divergences of any pair are
    those of its two compact distributions, whatever else is stacked with it.
    """

    prob: list[np.ndarray]  # per position (m, W_p) float64 probabilities of the union tokens
    logp: list[np.ndarray]  # per position (m, W_p) float64 log-probabilities
    prob32: np.ndarray  # (m, T) float32, all segments side by side (for Jensen–Shannon)
    starts: np.ndarray  # (P,) first column of each position's segment in prob32
    log_other: np.ndarray  # (m, P) log-prob of each single token outside the top-k
    outside: np.ndarray  # (P,) tokens outside the union at each position
    other_prob: np.ndarray  # (m, P) exp(log_other)
    other_plogp: np.ndarray  # (m, P) exp(log_other) · log_other
    negentropy: np.ndarray  # (m, P) Σ p log p over all outcomes (float64)
    g_double: np.ndarray  # (m, P) Σ 2p log 2p over union tokens, computed exactly as for mixtures
    top1: np.ndarray  # (m, P) most likely token
    cosine_rows: list[np.ndarray]  # per layer (m, probes·width): unit rows / √probes
    cka_rows: list[np.ndarray]  # per layer (m, probes²): centred Gram, unit Frobenius norm

    @classmethod
    def of(cls, sigs: Sequence[Signature]) -> _FunctionalStack:
        parts = [s.functional for s in sigs]
        ids = np.stack([p["topk_ids"] for p in parts]).astype(np.int64)  # (m, P, k)
        top = np.stack([p["topk_logp"] for p in parts]).astype(np.float64)
        m, positions, k = ids.shape
        vocab = int(parts[0].meta["vocab_size"])
        rest = np.maximum(np.stack([p["rest_logp"] for p in parts]).astype(np.float64), _MIN_LOG)
        log_other = rest - np.log(vocab - k)
        keys = np.arange(positions)[None, :, None] * vocab + ids
        union = np.unique(keys)
        starts = np.searchsorted(union, np.arange(positions) * vocab)
        widths = np.diff(np.append(starts, len(union)))
        logp = log_other[:, union // vocab]  # (m, T): the rest share, then the top-k on top
        np.put_along_axis(logp, np.searchsorted(union, keys).reshape(m, -1), top.reshape(m, -1), axis=1)
        prob = np.exp(logp)
        outside = (vocab - widths).astype(np.float64)
        negentropy = np.add.reduceat(prob * logp, starts, axis=1) + outside * np.exp(log_other) * log_other
        prob32 = prob.astype(np.float32)
        bounds = np.append(starts, len(union))
        return cls(
            prob=[np.ascontiguousarray(prob[:, s:e]) for s, e in pairwise(bounds)],
            logp=[np.ascontiguousarray(logp[:, s:e]) for s, e in pairwise(bounds)],
            prob32=prob32,
            starts=starts,
            log_other=log_other,
            outside=outside,
            other_prob=np.exp(log_other),
            other_plogp=np.exp(log_other) * log_other,
            negentropy=negentropy,
            g_double=_segment_slogs(prob32 + prob32, starts),
            top1=ids[:, :, 0],
            **_hidden_rows(np.stack([p["hidden"] for p in parts]).astype(np.float32)),
        )

    def features(self, pairs: _Pairs) -> np.ndarray:
        out = np.empty((len(pairs), 10))
        for sel, dot in pairs.chunks(CHUNK_PAIRS * 16):
            out[sel] = self._divergences(pairs.a[sel], pairs.b[sel], dot)
        cos = np.stack([pairs.dot(x) for x in self.cosine_rows], axis=1)
        cka = np.stack([pairs.dot(x) for x in self.cka_rows], axis=1)
        return np.concatenate([out, _depth_summary(cos), _depth_summary(cka)], axis=1)

    def _divergences(self, a: np.ndarray, b: np.ndarray, dot) -> np.ndarray:
        """(n, 10): KL(a‖b), KL(b‖a), JS (mean, median, p90 over positions each), top-1 agreement."""
        n, positions = len(a), len(self.prob)
        cross_ab, cross_ba = np.empty((positions, n)), np.empty((positions, n))
        for i, (p, lp) in enumerate(zip(self.prob, self.logp, strict=True)):
            cross_ab[i], cross_ba[i] = dot(p, lp), dot(lp, p)
        ra, rb = self.log_other[a], self.log_other[b]
        kl_ab = self.negentropy[a] - cross_ab.T - self.outside * self.other_prob[a] * rb
        kl_ba = self.negentropy[b] - cross_ba.T - self.outside * self.other_prob[b] * ra
        js = self._js(a, b)
        top1 = (self.top1[a] == self.top1[b]).mean(1)
        spreads = [_spread(np.maximum(v, 0.0)) for v in (kl_ab, kl_ba, js)]
        return np.concatenate([*spreads, top1[:, None]], axis=1)

    def _js(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(n, P) Jensen–Shannon divergences.

        With g(s) = Σ s log s over a position's union tokens, Σ p log p + Σ q log q − 2 Σ m log m
        (m = (p + q) / 2) is ½ g(2p) + ½ g(2q) − g(p + q): the log 2 terms cancel, one sum and one log
        per outcome are left, and a signature against itself gives exactly 0. Pairs that share their
        first member are mixed together, reading the second members' rows as one slice when they are
        consecutive (all pairs of a catalog), so no row is copied twice.
        """
        mixed = np.empty((len(a), len(self.starts)))
        buffer = np.empty((min(len(a), CHUNK_PAIRS), self.prob32.shape[1]), dtype=np.float32)
        for lo, hi in _runs(a, CHUNK_PAIRS):
            bs = b[lo:hi]
            rows = self.prob32[bs[0] : bs[-1] + 1] if _consecutive(bs) else self.prob32[bs]
            mix = np.add(rows, self.prob32[a[lo]], out=buffer[: hi - lo])
            mixed[lo:hi] = _segment_slogs(mix, self.starts)
        union = 0.25 * (self.g_double[a] + self.g_double[b]) - 0.5 * mixed
        half = 0.5 * (self.other_prob[a] + self.other_prob[b])
        pooled = self.outside * (0.5 * (self.other_plogp[a] + self.other_plogp[b]) - half * np.log(half))
        return union + pooled


def _runs(a: np.ndarray, longest: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of equal consecutive values of `a`, none longer than `longest`."""
    edges = np.flatnonzero(np.diff(a)) + 1
    bounds = np.concatenate([[0], edges, [len(a)]])
    runs = []
    for lo, hi in pairwise(bounds.tolist()):
        runs.extend((s, min(s + longest, hi)) for s in range(lo, hi, longest))
    return runs


def _consecutive(values: np.ndarray) -> bool:
    return (
        len(values) > 0
        and int(values[-1]) - int(values[0]) == len(values) - 1
        and bool((np.diff(values) == 1).all())
    )


def _segment_slogs(s: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Σ s log s per position segment (float32 in place on `s`, then widened)."""
    logs = np.log(s)
    logs *= s
    return np.add.reduceat(logs, starts, axis=1).astype(np.float64)


def _spread(per_position: np.ndarray) -> np.ndarray:
    """(n, P) → (n, 3): mean, median, 90th percentile over positions (quantiles in float32: 2× faster
    and far below the estimates' noise)."""
    q = np.quantile(per_position.astype(np.float32), [0.5, 0.9], axis=1)
    return np.stack([per_position.mean(1), q[0], q[1]], axis=1)


def _hidden_rows(hidden: np.ndarray) -> dict[str, list[np.ndarray]]:
    m, layers, probes, _ = hidden.shape
    norms = np.linalg.norm(hidden, axis=-1, keepdims=True)
    unit = np.where(norms > 0, hidden / np.where(norms > 0, norms, 1), 0) / np.sqrt(probes)
    centred = hidden - hidden.mean(axis=2, keepdims=True)
    gram = centred @ centred.transpose(0, 1, 3, 2)  # (m, L, probes, probes)
    fro = np.linalg.norm(gram, axis=(2, 3), keepdims=True)
    gram = np.where(fro > 0, gram / np.where(fro > 0, fro, 1), 0)
    cosine_rows = [np.ascontiguousarray(unit[:, i].reshape(m, -1)) for i in range(layers)]
    cka_rows = [np.ascontiguousarray(gram[:, i].reshape(m, -1)) for i in range(layers)]
    return {"cosine_rows": cosine_rows, "cka_rows": cka_rows}


# ----------------------------------------------------------------------------- structural


@dataclass
class _StructuralStack:
    x: np.ndarray  # (m, S) τ samples × √(numel/count): x_a · x_b estimates τ_a · τ_b
    kind_cols: list[np.ndarray]
    depth_cols: list[np.ndarray]
    sign_rows: np.ndarray  # (m, 2S): dot gives 1.5 Σw|s_a||s_b| + 0.5 Σw s_a s_b
    nonzero: np.ndarray  # (m,) Σ w |s|
    total: float  # Σ numel
    mask_rows: list[np.ndarray]  # per density (m, S): √w · [|τ| ≥ tensor's threshold]
    mask_sizes: list[np.ndarray]  # per density (m,) Σ w · mask
    norm: np.ndarray  # (m,) exact ‖τ‖
    base_norm: np.ndarray  # (m,) exact ‖θ_base‖
    identity: np.ndarray  # (m,) equal for signatures of the same content

    @classmethod
    def of(cls, sigs: Sequence[Signature]) -> _StructuralStack:
        parts = [s.structural for s in sigs]
        first = parts[0]
        counts, numel = first["counts"], first["numel"]
        owner = np.repeat(np.arange(len(counts)), counts)  # tensor of each sampled coordinate
        root_w = np.sqrt(numel[owner] / np.maximum(counts[owner], 1)).astype(np.float32)
        samples = np.stack([p["sample"] for p in parts]).astype(np.float32)
        x = samples * root_w
        signs = np.sign(samples) * root_w
        mags = np.abs(signs)
        sign_rows = np.concatenate([np.sqrt(1.5) * mags, np.sqrt(0.5) * signs], axis=1)
        weights = root_w.astype(np.float64) ** 2
        mask_rows, mask_sizes = [], []
        for density in MASK_DENSITIES:
            level = QUANTILE_LEVELS.index(round(1 - density, 6))
            thresholds = np.stack([p["quantiles"][:, level] for p in parts])[:, owner]
            mask = (np.abs(samples) >= thresholds) & (np.abs(samples) > 0)
            mask_rows.append(mask * root_w)
            mask_sizes.append((mask * weights).sum(1))
        return cls(
            x=x,
            kind_cols=[np.nonzero(first["kinds"][owner] == k)[0] for k in range(len(KINDS))],
            depth_cols=[np.nonzero(first["depths"][owner] == d)[0] for d in range(len(DEPTHS))],
            sign_rows=sign_rows,
            nonzero=(np.abs(np.sign(samples)) * weights).sum(1),
            total=float(numel.sum()),
            mask_rows=mask_rows,
            mask_sizes=mask_sizes,
            norm=np.sqrt(np.stack([p["sq_norm"].sum() for p in parts])),
            base_norm=np.sqrt(np.stack([p["base_sq_norm"].sum() for p in parts])),
            identity=np.unique([s.content_hash for s in sigs], return_inverse=True)[1],
        )

    def _group_cos(self, cols: np.ndarray, pairs: _Pairs) -> tuple[np.ndarray, ...]:
        a, b = pairs.a, pairs.b
        if len(cols) == 0:
            nan = np.full(len(a), np.nan)
            return nan, np.zeros(len(a)), np.zeros(len(a)), np.zeros(len(a))
        x = np.ascontiguousarray(self.x[:, cols])
        self_dot = (x.astype(np.float64) ** 2).sum(1)
        dot = pairs.dot(x)
        return _safe_div(dot, np.sqrt(self_dot[a] * self_dot[b])), dot, self_dot[a], self_dot[b]

    def features(self, pairs: _Pairs) -> np.ndarray:
        a, b = pairs.a, pairs.b
        kinds = [self._group_cos(cols, pairs) for cols in self.kind_cols]
        dot = sum(k[1] for k in kinds)
        cos = _safe_div(dot, np.sqrt(sum(k[2] for k in kinds) * sum(k[3] for k in kinds)))
        depths = [self._group_cos(cols, pairs)[0] for cols in self.depth_cols]
        agree = (self.total - self.nonzero[a] - self.nonzero[b] + pairs.dot(self.sign_rows)) / self.total
        overlaps = [
            _safe_div(pairs.dot(rows), np.sqrt(sizes[a] * sizes[b]))
            for rows, sizes in zip(self.mask_rows, self.mask_sizes, strict=True)
        ]
        na, nb = self.norm[a], self.norm[b]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_ratio = np.where(
                (na > 0) & (nb > 0), np.log(np.where(na > 0, na, 1) / np.where(nb > 0, nb, 1)), np.nan
            )
        # float32 Gram products leave cos ≈ 1 − 1e-7 for a signature with itself, which the distance
        # would amplify to ~1e-3 ‖τ‖; a pair of one signature is exactly at distance 0.
        cos_for_dist = np.where(self.identity[a] == self.identity[b], 1.0, np.nan_to_num(cos))
        dist = np.sqrt(np.maximum(na**2 + nb**2 - 2 * na * nb * cos_for_dist, 0.0))
        base = self.base_norm[a]
        return np.stack(
            [
                cos,
                *(k[0] for k in kinds),
                *depths,
                agree,
                *overlaps,
                log_ratio,
                dist,
                _safe_div(dist, base),
                na,
                nb,
                _safe_div(na, base),
                _safe_div(nb, self.base_norm[b]),
            ],
            axis=1,
        )


# ----------------------------------------------------------------------------- public API

N_FUNCTIONAL = 10 + 5 + 5


def _groups(sigs: Sequence[Signature], key) -> dict[object, np.ndarray]:
    groups: dict[object, list[int]] = {}
    for i, sig in enumerate(sigs):
        k = key(sig)
        if k is not None:
            groups.setdefault(k, []).append(i)
    return {k: np.array(v) for k, v in groups.items()}


def _functional_key(sig: Signature):
    f = sig.functional
    return None if f is None else (f.meta["token_key"], f.meta["vocab_size"], f["hidden"].shape)


def _structural_key(sig: Signature):
    s = sig.structural
    return None if s is None else (s.meta["base_hash"], s.meta["layout"])


def _as_index(
    signatures: Sequence[Signature] | Mapping[str, Signature], pairs
) -> tuple[list[Signature], np.ndarray]:
    if isinstance(signatures, Mapping):
        names = list(signatures)
        position = {n: i for i, n in enumerate(names)}
        try:
            index = np.array([[position[a], position[b]] for a, b in pairs], dtype=np.int64).reshape(-1, 2)
        except KeyError as exc:
            raise SimMergeError(f"no signature for checkpoint {exc.args[0]!r}") from None
        return [signatures[n] for n in names], index
    sigs = list(signatures)
    index = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(index) and (index.min() < 0 or index.max() >= len(sigs)):
        raise SimMergeError(f"pair index {int(index.max())} is outside the {len(sigs)} signatures")
    return sigs, index


def pairwise_features(signatures: Sequence[Signature] | Mapping[str, Signature], pairs) -> np.ndarray:
    """(n, len(feature_names())) features for ordered pairs.

    `signatures` is a sequence with `pairs` an (n, 2) integer array, or a name → signature mapping with
    `pairs` a sequence of (name, name). A feature the two signatures cannot support (different tokenizer
    or probes, different base, a missing part) is NaN.
    """
    sigs, index = _as_index(signatures, pairs)
    # One BLAS thread: most products are small (m × W_p per position), where waking threads costs more
    # than the work, and on a shared machine even large Grams ran 2-4× faster single-threaded.
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        return _clip_bounded(_pairwise(sigs, index))


def _pairwise(sigs: list[Signature], index: np.ndarray) -> np.ndarray:
    out = np.full((len(index), len(feature_names())), np.nan)
    for key, cols, make in (
        (_functional_key, slice(0, N_FUNCTIONAL), _FunctionalStack.of),
        (_structural_key, slice(N_FUNCTIONAL, None), _StructuralStack.of),
    ):
        for members in _groups(sigs, key).values():
            local = np.full(len(sigs), -1)
            local[members] = np.arange(len(members))
            a, b = local[index[:, 0]], local[index[:, 1]]
            rows = np.nonzero((a >= 0) & (b >= 0))[0]
            if len(rows):
                plan = _Pairs(a[rows], b[rows], len(members))
                out[rows, cols] = make([sigs[i] for i in members]).features(plan)
    return out


def _clip_bounded(out: np.ndarray) -> np.ndarray:
    """Cosines, CKA, agreements and overlaps lie in known ranges; float32 Gram products can step a hair
    outside (1 + 1e-6), which would only confuse readers and split trees on noise."""
    for i, name in enumerate(feature_names()):
        if name.startswith(("hidden_cos", "tv_cos")):
            np.clip(out[:, i], -1.0, 1.0, out=out[:, i])
        elif name.startswith(("cka", "sign_agree", "mask_overlap", "top1")):
            np.clip(out[:, i], 0.0, 1.0, out=out[:, i])
    return out


def pair_features(a: Signature, b: Signature) -> dict[str, float]:
    """Named features of one ordered pair."""
    row = pairwise_features([a, b], np.array([[0, 1]]))[0]
    return dict(zip(feature_names(), (float(v) for v in row), strict=True))
