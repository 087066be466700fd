"""Plans rendered from a shape's template equal plans rendered directly, for any names."""

from __future__ import annotations

import itertools
import math

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


def test_a_shape_whose_values_json_would_not_keep_is_rendered_directly() -> None:
    from models.descriptors import OperatorSetting

    odd = OperatorSetting("ties", {"density": float("nan")})
    candidate = Candidate(("math", "code"), (odd,))
    for _ in range(2):
        rendered = render(candidate, "base")
        density = rendered.plan["steps"][0]["parameters"]["density"]
        assert isinstance(density, float) and math.isnan(density)  # not JSON's null
        assert rendered.mergekit_yaml == _direct(candidate, "base").mergekit_yaml
