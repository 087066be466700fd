"""The zoo's word-level tokenizer, saved so that `AutoTokenizer.from_pretrained` gives the same ids.

transformers picks a tokenizer class from `config.json`'s `model_type`, and some classes rebuild
their own tokenizer instead of reading `tokenizer.json` (a word-level vocabulary then comes back split
into characters). The zoo uses llama, which keeps it, but `save_verified_tokenizer` checks the round
trip anyway and fails loudly, so a transformers upgrade cannot silently change what the experts see.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from simmerge.errors import CheckpointError


def build_tokenizer(words: list[str]):
    """A `PreTrainedTokenizerFast` over exactly `words` (split on whitespace, no BOS inserted)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def save_verified_tokenizer(tokenizer, directory: Path, texts: Iterable[str]) -> None:
    """Save next to the model's config.json, reload through AutoTokenizer and compare ids on `texts`."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(directory)
    reloaded = AutoTokenizer.from_pretrained(directory)
    for text in texts:
        expected = tokenizer(text)["input_ids"]
        got = reloaded(text)["input_ids"]
        if got != expected:
            raise CheckpointError(
                f"{directory}: AutoTokenizer ({type(reloaded).__name__}) tokenizes {text!r} as {got}, "
                f"but the zoo trained with {expected}; this transformers version ignores the saved "
                "tokenizer.json for this model_type"
            )
    if reloaded.pad_token_id != tokenizer.pad_token_id:
        raise CheckpointError(
            f"{directory}: reloaded pad id {reloaded.pad_token_id} != trained pad id {tokenizer.pad_token_id}"
        )
