"""A recommended plan's steps, description, mergekit YAML and plan dict, rendered once per plan shape.

Building a `Plan` and writing its YAML costs ~50 µs a plan, a fifth of a batched recommendation. Two
plans with the same settings, member count and base presence differ only in their names, so each
shape is rendered once with placeholder names and every later plan of that shape fills in its own.
Names that could render differently from a placeholder (quoted in YAML, or holding the placeholder
mark) take the direct path; tests pin both paths equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from models.plan_search import Candidate
from simmerge.yaml_text import is_plain

_MARK = "__simmerge_"
_PLACEHOLDER = re.compile(r"__simmerge_(?:member_\d+|base)__")
_BASE = "__simmerge_base__"
_MEMO_LIMIT = 4096


@dataclass(frozen=True)
class Rendering:
    steps: list[dict[str, Any]]
    description: str
    mergekit_yaml: str
    plan: dict[str, Any]


def render(candidate: Candidate, base: str | None) -> Rendering:
    """What `Candidate.to_plan(base)` and `Candidate.steps()` give, from the shape's template."""
    names = [*candidate.models, *([base] if base is not None else [])]
    if len(set(names)) != len(names) or not all(_substitutable(n) for n in names):
        return _direct(candidate, base)
    key = (candidate.settings, len(candidate.models), base is not None)
    if key not in _TEMPLATES:
        if len(_TEMPLATES) >= _MEMO_LIMIT:
            _TEMPLATES.clear()
        _TEMPLATES[key] = _template(candidate, base is not None)
    template = _TEMPLATES[key]
    if template is None:  # this shape has a value its JSON would not keep
        return _direct(candidate, base)
    names_of = {_member(i): m for i, m in enumerate(candidate.models)}
    if base is not None:
        names_of[_BASE] = base
    fill = lambda text: _PLACEHOLDER.sub(lambda found: names_of[found.group(0)], text)  # noqa: E731
    # the dicts through their JSON: plain names need no escaping, and orjson rebuilds them faster
    # than a Python walk copies them
    steps, plan = orjson.loads(fill(template.dicts_json))
    return Rendering(
        steps=steps,
        description=fill(template.description),
        mergekit_yaml=fill(template.mergekit_yaml),
        plan=plan,
    )


def _direct(candidate: Candidate, base: str | None) -> Rendering:
    plan = candidate.to_plan(base)
    return Rendering(candidate.steps(), plan.describe(), plan.to_yaml(), plan.to_dict())


@dataclass(frozen=True)
class _Template:
    description: str
    mergekit_yaml: str
    dicts_json: str  # [steps, plan]


def _template(candidate: Candidate, has_base: bool) -> _Template | None:
    shaped = Candidate(tuple(_member(i) for i in range(len(candidate.models))), candidate.settings)
    rendered = _direct(shaped, _BASE if has_base else None)
    dicts = orjson.dumps([rendered.steps, rendered.plan]).decode()
    if orjson.loads(dicts) != [rendered.steps, rendered.plan]:  # a value JSON does not keep (NaN)
        return None
    return _Template(rendered.description, rendered.mergekit_yaml, dicts)


def _member(index: int) -> str:
    return f"{_MARK}member_{index}__"


def _substitutable(name: str) -> bool:
    """Renders in YAML exactly as a placeholder does (plain) and cannot be mistaken for one."""
    return _MARK not in name and is_plain(name)


_TEMPLATES: dict[tuple[Any, int, bool], _Template | None] = {}
