"""Block YAML for plain plan documents, written directly: PyYAML's Python representer costs ~0.3 ms
per plan, more than everything else a recommendation does per plan.

`dump_all` writes exactly the text `yaml.dump_all(docs, Dumper=yaml.SafeDumper, sort_keys=False)`
writes (pinned by tests/test_plan.py) for documents of string keys and values, lists, numbers,
booleans and nulls, where every string is a plain scalar PyYAML would not quote. Anything else
(a name such as `true` or `1.5`, a string with spaces, a tuple) is handed to PyYAML itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

# Strings PyYAML writes unquoted: a letter or underscore first, then only these characters; and not
# one of the words its YAML 1.1 resolver reads as a boolean or a null.
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*\Z")
_RESOLVED_WORDS = frozenset(
    w
    for word in ("yes", "no", "true", "false", "on", "off", "null")
    for w in (word, word.title(), word.upper())
)


class _NotPlain(Exception):
    """A value this writer does not render as PyYAML would."""


def dump_all(documents: Sequence[Any], fallback: Callable[[Sequence[Any]], str]) -> str:
    """YAML text of `documents` (mappings), or `fallback(documents)` when one needs PyYAML."""
    try:
        texts = []
        for document in documents:
            if not isinstance(document, dict) or not document:
                raise _NotPlain
            lines: list[str] = []
            _mapping(document, 0, lines)
            texts.append("\n".join(lines) + "\n")
    except _NotPlain:
        return fallback(documents)
    return "---\n".join(texts)


def _scalar(value: Any) -> str:
    kind = type(value)
    if kind is str:
        if is_plain(value):
            return value
        raise _NotPlain
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value).lower()
        if "." not in text and "e" in text:  # YAML 1.1 needs the dot: 1e-05 would read as a string
            text = text.replace("e", ".0e", 1)
        return text
    raise _NotPlain


def is_plain(text: str) -> bool:
    """Whether PyYAML writes `text` unquoted; remembered, as plans repeat the same names and methods."""
    plain = _PLAIN_STRINGS.get(text)
    if plain is None:
        plain = _PLAIN.match(text) is not None and text not in _RESOLVED_WORDS
        if len(_PLAIN_STRINGS) >= _PLAIN_MEMO_LIMIT:
            _PLAIN_STRINGS.clear()
        _PLAIN_STRINGS[text] = plain
    return plain


_PLAIN_MEMO_LIMIT = 1 << 16
_PLAIN_STRINGS: dict[str, bool] = {}


def _mapping(mapping: dict, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for key, value in mapping.items():
        if type(key) is not str:
            raise _NotPlain
        key_text = _scalar(key)
        if type(value) is dict and value:
            lines.append(f"{pad}{key_text}:")
            _mapping(value, indent + 2, lines)
        elif type(value) is list and value:
            lines.append(f"{pad}{key_text}:")
            _sequence(value, indent, lines)  # PyYAML does not indent a sequence under its key
        else:
            lines.append(f"{pad}{key_text}: {_collection_or_scalar(value)}")


def _sequence(items: list, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for item in items:
        if (type(item) is dict or type(item) is list) and item:
            nested: list[str] = []
            if type(item) is dict:
                _mapping(item, indent + 2, nested)
            else:
                _sequence(item, indent + 2, nested)
            nested[0] = f"{pad}- {nested[0][indent + 2 :]}"
            lines.extend(nested)
        else:
            lines.append(f"{pad}- {_collection_or_scalar(item)}")


def _collection_or_scalar(value: Any) -> str:
    if type(value) is dict:
        return "{}"
    if type(value) is list:
        return "[]"
    return _scalar(value)
