"""Tiny, real Hugging Face Llama checkpoints made on the spot (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_llama(
    path: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie: bool = False,
    hidden: int = 32,
    layers: int = 2,
    vocab: int = 64,
    max_shard_size: str | None = None,
) -> Path:
    """A random-init LlamaForCausalLM saved as safetensors; same shapes for the same sizes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # random norms too, so merges of norm weights are not trivially equal
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def derive_expert(base: Path, path: Path, seed: int, scale: float = 0.02) -> Path:
    """A checkpoint with the base's shapes plus a seeded random task vector (what fine-tuning leaves)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(
                torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype) * scale
            )
    model.save_pretrained(path, safe_serialization=True)
    return path
