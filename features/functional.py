"""Functional signatures: what a checkpoint does on the probes, from one batched forward pass.

At seeded token positions we keep the top-k next-token log-probabilities with their ids and the log of
the remaining mass (size independent of the vocabulary); per layer we keep each probe's hidden state
mean-pooled over its real tokens, projected by a fixed seeded random matrix (or zero-padded) to a fixed
width (size independent of the model's width). Probes are right-padded with an attention mask, so the
real tokens never see padding and the result does not depend on the batch size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from features.schema import SignatureConfig
from features.signature import SignaturePart
from simmerge.errors import SimMergeError


def load_probe_texts(path: Path) -> list[str]:
    """Probe texts from a `{"text"}` JSON Lines file; an empty or malformed file is an error naming it."""
    from simmerge.evaluation import load_probes

    path = Path(path)
    if not path.is_file():
        raise SimMergeError(f"probe file {path} does not exist")
    return load_probes(path)


def probe_hash(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def encode_probes(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    encoded = [list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]
    empty = [t for t, ids in zip(texts, encoded, strict=True) if not ids]
    if empty:
        raise SimMergeError(f"probe {empty[0]!r} tokenizes to nothing")
    return encoded


def probe_positions(encoded: Sequence[Sequence[int]], config: SignatureConfig) -> np.ndarray:
    """(n, 2) rows of (probe, token index): `config.positions` spread evenly over the probes, each
    probe's a seeded choice fixed by its length (so the divergence cost does not grow with the probes)."""
    n = len(encoded)
    rows = []
    for j, ids in enumerate(encoded):
        share = config.positions // n + (j < config.positions % n)
        rng = np.random.default_rng([config.seed, j, len(ids)])
        chosen = rng.choice(len(ids), size=min(share, len(ids)), replace=False)
        rows.extend((j, int(p)) for p in sorted(chosen))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def projection(hidden: int, width: int, seed: int) -> torch.Tensor | None:
    """Fixed Gaussian projection hidden → width (None when hidden ≤ width: we zero-pad instead)."""
    if hidden <= width:
        return None
    generator = torch.Generator().manual_seed(hash_seed(seed, "projection", hidden))
    return torch.randn(hidden, width, generator=generator) / width**0.5


def hash_seed(*parts: object) -> int:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _fit_width(pooled: torch.Tensor, proj: torch.Tensor | None, width: int) -> torch.Tensor:
    if proj is not None:
        return pooled @ proj
    return torch.nn.functional.pad(pooled, (0, width - pooled.shape[-1]))


@torch.inference_mode()
def functional_signature(
    model,
    tokenizer,
    texts: Sequence[str],
    config: SignatureConfig,
    batch_size: int = 16,
    device: str = "cpu",
) -> SignaturePart:
    """The functional part for one loaded model (eval mode, on `device`)."""
    encoded = encode_probes(tokenizer, texts, config.max_length)
    positions = probe_positions(encoded, config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    k = config.top_k
    hidden_size = int(model.config.get_text_config().hidden_size)
    proj = projection(hidden_size, config.hidden_width, config.seed)
    topk_logp = np.zeros((len(positions), k), dtype=np.float32)
    topk_ids = np.zeros((len(positions), k), dtype=np.int32)
    rest = np.zeros(len(positions), dtype=np.float32)
    pooled_layers: list[list[torch.Tensor]] = []
    vocab = None
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        length = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        weights = mask.to(device, torch.float32).unsqueeze(-1)
        for layer, states in enumerate(out.hidden_states):
            pooled = (states.float() * weights).sum(1) / weights.sum(1)
            if layer == len(pooled_layers):
                pooled_layers.append([])
            pooled_layers[layer].append(_fit_width(pooled.cpu(), proj, config.hidden_width))
        rows = np.nonzero((positions[:, 0] >= start) & (positions[:, 0] < start + len(batch)))[0]
        picked = out.logits[positions[rows, 0] - start, positions[rows, 1]].float()
        logp = torch.log_softmax(picked, dim=-1)
        vocab = logp.shape[-1]
        values, ids = torch.topk(logp, min(k, vocab), dim=-1)
        topk_logp[rows] = values.cpu().numpy()
        topk_ids[rows] = ids.cpu().numpy()
        rest[rows] = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1).cpu().numpy()
    if vocab is None or vocab <= k:
        raise SimMergeError(f"vocabulary of {vocab} tokens is too small for top_k={k}")
    hidden = torch.stack([torch.cat(chunks) for chunks in pooled_layers]).numpy().astype(np.float32)
    token_key = hashlib.sha256(json.dumps(encoded).encode()).hexdigest()[:16]
    meta = {
        "probe_hash": probe_hash(texts),
        "token_key": f"{config.functional_key()}-{token_key}",
        "vocab_size": int(vocab),
        "hidden_size": hidden_size,
        "n_layers": int(hidden.shape[0]),
    }
    arrays = {
        "positions": positions,
        "topk_logp": topk_logp,
        "topk_ids": topk_ids,
        "rest_logp": rest,
        "hidden": hidden,
    }
    return SignaturePart("functional", meta, arrays)


def checkpoint_functional(
    path: Path, texts: Sequence[str], config: SignatureConfig, batch_size: int = 16, device: str = "cpu"
) -> SignaturePart:
    """Load a checkpoint (float32, offline) and take its functional part."""
    from simmerge.evaluation import load_model

    model, tokenizer = load_model(path, device=device)
    return functional_signature(model, tokenizer, texts, config, batch_size=batch_size, device=device)
