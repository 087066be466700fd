"""Recommendations that arrive together share one selector call; a bad query fails only its request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.adapters import RecommendationQuery
from service.batching import RecommendationBatcher
from simmerge.errors import NotFoundError


class CountingSelector:
    """Answers each query with its models and base; a query naming "poison" makes the whole call fail."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def recommend_many(self, queries: list[RecommendationQuery]) -> list[list[dict[str, Any]]]:
        self.calls.append(len(queries))
        if any("poison" in q.models for q in queries):
            raise NotFoundError("the pair features have no row for 'poison'")
        return [[{"rank": 1, "models": list(q.models), "top": q.top, "base": q.base}] for q in queries]


def catalog_bases(names: set[str]) -> dict[str, str | None]:
    """Every name but "missing" is a checkpoint; "other-*" ones have another base."""
    return {n: ("other" if n.startswith("other-") else "base") for n in names if n != "missing"}


def batcher_for(selector: CountingSelector, **options: Any) -> RecommendationBatcher:
    return RecommendationBatcher(selector, catalog_bases, **options)


def answers(batcher: RecommendationBatcher, queries: list[RecommendationQuery]) -> list[Any]:
    """Each query's plans, or its exception, all asked on one turn of the loop."""

    async def main() -> list[Any]:
        return await asyncio.gather(*(batcher.recommend(q) for q in queries), return_exceptions=True)

    return asyncio.run(main())


def query(*models: str, top: int = 3) -> RecommendationQuery:
    return RecommendationQuery(tuple(models), top)


def test_requests_of_one_loop_turn_share_one_call_and_get_their_own_answers():
    selector = CountingSelector()
    sizes: list[int] = []
    batcher = batcher_for(selector, observe=sizes.append)

    async def main() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(*(batcher.recommend(query("a", f"e{i}", top=i + 1)) for i in range(5)))

    answers = asyncio.run(main())
    assert selector.calls == [5] and sizes == [5]
    assert [a[0]["models"] for a in answers] == [["a", f"e{i}"] for i in range(5)]
    assert [a[0]["top"] for a in answers] == [1, 2, 3, 4, 5]


def test_a_lone_request_is_answered_alone_and_batches_are_capped():
    selector = CountingSelector()
    batcher = batcher_for(selector, max_batch=2)

    async def main() -> None:
        assert (await batcher.recommend(query("a", "b")))[0]["models"] == ["a", "b"]
        await asyncio.gather(*(batcher.recommend(query("a", f"e{i}")) for i in range(5)))

    asyncio.run(main())
    assert selector.calls == [1, 2, 2, 1]


def test_bases_come_from_the_catalog_and_an_unknown_checkpoint_fails_only_its_request():
    selector = CountingSelector()
    shared, unknown, mixed = answers(
        batcher_for(selector), [query("a", "b"), query("a", "missing"), query("b", "other-c")]
    )
    assert isinstance(unknown, NotFoundError) and "'missing'" in str(unknown)
    assert shared[0]["base"] == "base" and mixed[0]["base"] is None  # no common base: base-free operators
    assert selector.calls == [2]


def test_a_query_the_selector_rejects_fails_only_its_own_request():
    selector = CountingSelector()
    good, bad, other = answers(
        batcher_for(selector), [query("a", "b"), query("a", "poison"), query("b", "c")]
    )
    assert isinstance(bad, NotFoundError) and "'poison'" in str(bad)
    assert good[0]["models"] == ["a", "b"] and other[0]["models"] == ["b", "c"]
    assert selector.calls == [3, 1, 1, 1]  # the batch failed, then each query alone


def test_a_cancelled_request_is_left_out_of_its_batch():
    selector = CountingSelector()
    batcher = batcher_for(selector)

    async def main() -> list[dict[str, Any]]:
        gone = asyncio.ensure_future(batcher.recommend(query("a", "gone")))
        kept = asyncio.ensure_future(batcher.recommend(query("a", "kept")))
        await asyncio.sleep(0)  # both queued; the flush is scheduled behind them
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await kept

    assert asyncio.run(main())[0]["models"] == ["a", "kept"]
    assert selector.calls == [1]


def test_after_a_busy_batch_a_flush_waits_its_window_for_company():
    selector = CountingSelector()
    batcher = batcher_for(selector, window_s=0.05)

    async def main() -> None:
        await asyncio.gather(*(batcher.recommend(query("a", f"e{i}")) for i in range(3)))  # load seen
        first = asyncio.ensure_future(batcher.recommend(query("a", "late-1")))
        await asyncio.sleep(0.01)  # within the window: joins the same call
        second = asyncio.ensure_future(batcher.recommend(query("a", "late-2")))
        await asyncio.gather(first, second)
        await batcher.recommend(query("a", "alone"))  # the last batch had two: still waits, then alone

    asyncio.run(main())
    assert selector.calls == [3, 2, 1]
