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

import numpy as np

from features.schema import DEPTHS, KINDS, MASK_DENSITIES, QUANTILE_LEVELS, depth_thirds, feature_names
from features.signature import Signature
from simmerge.errors import SimMergeError

CHUNK_PAIRS = 2048  # pairs per chunk for divergences (bounds memory at ~100 MB)
_MIN_LOG = -80.0  # log-mass floor: a model that puts no mass outside its top-k still gets a finite log


def _pair_dot(x: np.ndarray, a: np.ndarray, b: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """Σ_j x[a, j] · y[b, j] for every pair, by Gram blocks when pairs are dense, else row by row."""
    y = x if y is None else y
    n, m = len(a), x.shape[0]
    out = np.empty(n, dtype=np.float64)
    if n == 0:
        return out
    if n * 16 >= m * m:
        order = np.argsort(a, kind="stable")
        sorted_a = a[order]
        block = max(1, min(m, (64 * 2**20) // max(1, 4 * m)))
        for start in range(0, m, block):
            lo, hi = np.searchsorted(sorted_a, [start, start + block])
            if lo == hi:
                continue
            sel = order[lo:hi]
            gram = x[start : start + block] @ y.T
            out[sel] = gram[a[sel] - start, b[sel]]
    else:
        step = max(1, (32 * 2**20) // max(1, 4 * x.shape[1]))
        for start in range(0, n, step):
            sa, sb = a[start : start + step], b[start : start + step]
            out[start : start + step] = np.einsum("ij,ij->i", x[sa], y[sb])
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
    ids: np.ndarray  # (m, P, k) int32
    logp: np.ndarray  # (m, P, k) float32
    log_other: np.ndarray  # (m, P): log-prob of each single token outside the top-k
    others: int  # vocabulary − k
    cosine_rows: list[np.ndarray]  # per layer (m, probes·width): unit rows / √probes
    cka_rows: list[np.ndarray]  # per layer (m, probes²): centred Gram, unit Frobenius norm

    @classmethod
    def of(cls, sigs: Sequence[Signature]) -> _FunctionalStack:
        parts = [s.functional for s in sigs]
        ids = np.stack([p["topk_ids"] for p in parts]).astype(np.int32)
        logp = np.stack([p["topk_logp"] for p in parts]).astype(np.float32)
        others = int(parts[0].meta["vocab_size"]) - ids.shape[2]
        rest = np.maximum(np.stack([p["rest_logp"] for p in parts]).astype(np.float32), _MIN_LOG)
        hidden = np.stack([p["hidden"] for p in parts]).astype(np.float32)  # (m, L, probes, width)
        return cls(ids, logp, rest - np.log(others), others, *_hidden_rows(hidden))

    def features(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        div = np.concatenate(
            [
                self._divergences(a[s : s + CHUNK_PAIRS], b[s : s + CHUNK_PAIRS])
                for s in range(0, len(a), CHUNK_PAIRS)
            ]
        )
        cos = np.stack([_pair_dot(x, a, b) for x in self.cosine_rows], axis=1)
        cka = np.stack([_pair_dot(x, a, b) for x in self.cka_rows], axis=1)
        return np.concatenate([div, _depth_summary(cos), _depth_summary(cka)], axis=1)

    def _divergences(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ia, ib, la, lb = self.ids[a], self.ids[b], self.logp[a], self.logp[b]
        ra, rb = self.log_other[a][..., None], self.log_other[b][..., None]
        eq = ia[..., :, None] == ib[..., None, :]  # (n, P, k, k): a's i-th token is b's j-th
        b_has, a_has = eq.any(-1), eq.any(-2)
        eqf = eq.astype(np.float32)
        lb_on_a = np.where(b_has, np.einsum("npij,npj->npi", eqf, lb), rb)
        # b's top tokens that a's top-k lacks; a gives each the per-token rest share
        only_b = ~a_has
        rest_count = (self.others - only_b.sum(-1))[..., None].astype(np.float32)  # outcomes in neither
        # outcomes: a's top-k, b's top-k not in a's, and the pooled rest (count × per-token share)
        lp = [la, np.broadcast_to(ra, lb.shape), ra + np.log(np.maximum(rest_count, 1))]
        lq = [lb_on_a, lb, rb + np.log(np.maximum(rest_count, 1))]
        weight = [np.ones_like(la), only_b.astype(np.float32), (rest_count > 0).astype(np.float32)]
        kl_ab = sum(_sum_last(w * np.exp(p) * (p - q)) for w, p, q in zip(weight, lp, lq, strict=True))
        kl_ba = sum(_sum_last(w * np.exp(q) * (q - p)) for w, p, q in zip(weight, lp, lq, strict=True))
        js = sum(_sum_last(w * _js_terms(p, q)) for w, p, q in zip(weight, lp, lq, strict=True))
        kl_ab, kl_ba, js = (np.maximum(v, 0.0) for v in (kl_ab, kl_ba, js))
        top1 = (ia[..., 0] == ib[..., 0]).mean(1)
        return np.concatenate([_spread(kl_ab), _spread(kl_ba), _spread(js), top1[:, None]], axis=1)


def _sum_last(x: np.ndarray) -> np.ndarray:
    return x.sum(-1, dtype=np.float64)


def _js_terms(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    lm = np.logaddexp(lp, lq) - np.log(2.0)
    return 0.5 * (np.exp(lp) * (lp - lm) + np.exp(lq) * (lq - lm))


def _spread(per_position: np.ndarray) -> np.ndarray:
    """(n, P) → (n, 3): mean, median, 90th percentile over positions."""
    q = np.quantile(per_position, [0.5, 0.9], axis=1)
    return np.stack([per_position.mean(1), q[0], q[1]], axis=1)


def _hidden_rows(hidden: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    m, layers, probes, _ = hidden.shape
    norms = np.linalg.norm(hidden, axis=-1, keepdims=True)
    unit = np.where(norms > 0, hidden / np.where(norms > 0, norms, 1), 0) / np.sqrt(probes)
    centred = hidden - hidden.mean(axis=2, keepdims=True)
    gram = centred @ centred.transpose(0, 1, 3, 2)  # (m, L, probes, probes)
    fro = np.linalg.norm(gram, axis=(2, 3), keepdims=True)
    gram = np.where(fro > 0, gram / np.where(fro > 0, fro, 1), 0)
    cosine_rows = [np.ascontiguousarray(unit[:, i].reshape(m, -1)) for i in range(layers)]
    cka_rows = [np.ascontiguousarray(gram[:, i].reshape(m, -1)) for i in range(layers)]
    return cosine_rows, cka_rows


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

    def _group_cos(self, cols: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
        if len(cols) == 0:
            nan = np.full(len(a), np.nan)
            return nan, np.zeros(len(a)), np.zeros(len(a)), np.zeros(len(a))
        x = np.ascontiguousarray(self.x[:, cols])
        self_dot = (x.astype(np.float64) ** 2).sum(1)
        dot = _pair_dot(x, a, b)
        return _safe_div(dot, np.sqrt(self_dot[a] * self_dot[b])), dot, self_dot[a], self_dot[b]

    def features(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        kinds = [self._group_cos(cols, a, b) for cols in self.kind_cols]
        dot = sum(k[1] for k in kinds)
        cos = _safe_div(dot, np.sqrt(sum(k[2] for k in kinds) * sum(k[3] for k in kinds)))
        depths = [self._group_cos(cols, a, b)[0] for cols in self.depth_cols]
        agree = (
            self.total - self.nonzero[a] - self.nonzero[b] + _pair_dot(self.sign_rows, a, b)
        ) / self.total
        overlaps = [
            _safe_div(_pair_dot(rows, a, b), np.sqrt(sizes[a] * sizes[b]))
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
                out[rows, cols] = make([sigs[i] for i in members]).features(a[rows], b[rows])
    return _clip_bounded(out)


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
