"""Plans rendered from a shape's template equal plans rendered directly, for any names."""

from __future__ import annotations

import itertools

import pytest

from models.descriptors import DEFAULT_SETTINGS
from models.plan_render import _direct, render
from models.plan_search import Candidate

NAMES = [
    ("math", "code", "chat"),
    ("m-1", "org/m.2", "a_b"),
    ("true", "two words", "x: y"),  # YAML would quote these: the direct path
    ("__simmerge_member_1__", "b", "c"),  # looks like a placeholder: the direct path
]


@pytest.mark.parametrize("names", NAMES)
@pytest.mark.parametrize("base", [None, "base", "math"])
def test_template_rendering_equals_direct_rendering(names: tuple[str, ...], base: str | None) -> None:
    settings = DEFAULT_SETTINGS[:6]
    candidates = [Candidate(names[:2], (s,)) for s in settings]
    candidates += [Candidate(names, (s,)) for s in settings if s.method != "slerp"]
    candidates += [Candidate(names, pair) for pair in itertools.product(settings[:3], repeat=2)]
    for _ in range(2):  # the second time from the memoised templates
        for candidate in candidates:
            assert render(candidate, base) == _direct(candidate, base), candidate
