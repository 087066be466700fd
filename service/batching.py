"""Recommendations that arrive together are answered by one catalog lookup and one selector call.

The recommendation route runs on the event loop, and a process runs one selector call at a time. Under
load, requests pile up while a call runs, and answering each alone would pay the selector's fixed costs
(a prediction per search round, an explanation call, the trees read back into cache) once per request.
Instead a request queues its query and waits; the first to queue schedules a flush on the loop's next
turn, and the flush looks up every query queued by then in the catalog (are its checkpoints there,
and which base do they share?) and hands them to `Selector.recommend_many` at once. A lone client
waits for nothing: its flush runs on the next turn, with a batch of one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from service.adapters import RecommendationQuery, Selector
from simmerge.errors import NotFoundError

Waiting = tuple[RecommendationQuery, "asyncio.Future[dict[str, Any]]"]


class RecommendationBatcher:
    """Queue of recommendation queries, flushed once per event-loop turn (at most `max_batch` a call)."""

    def __init__(
        self,
        selector: Selector,
        bases: Callable[[set[str]], dict[str, str | None]],
        *,
        max_batch: int = 64,
        window_s: float = 0.001,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        self.selector = selector
        self.bases = bases  # name → base of the named checkpoints that exist (`Catalog.bases`)
        self.max_batch = max_batch
        self._observe = observe  # told each batch's size (a metric)
        self.window_s = window_s  # how long a flush waits for company while requests keep coming
        self._waiting: list[Waiting] = []
        self._scheduled = False
        self._busy = False  # the last flush answered more than one request

    async def recommend(self, query: RecommendationQuery) -> dict[str, Any]:
        """The query's ranked plans (`{"plans", "ranked_by"}`), computed with whatever else is queued on
        this turn of the loop; its `base` is filled in from the catalog (NotFoundError for a checkpoint
        not there)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._waiting.append((query, future))
        if not self._scheduled:
            self._scheduled = True
            if self._busy and self.window_s > 0:
                loop.call_later(self.window_s, self._flush)
            else:
                loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
        if self._waiting:
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            self._scheduled = False
        live = [(query, future) for query, future in batch if not future.done()]  # skip cancelled requests
        try:
            live = self._with_bases(live)
        except Exception as exc:  # the catalog did not answer: every request of the batch says so
            for _, future in live:
                _settle(future, exception=exc)
            return
        self._busy = len(live) > 1
        if not live:
            return
        if self._observe is not None:
            self._observe(len(live))
        try:
            results = self.selector.recommend_many([query for query, _ in live])
        except Exception as exc:  # one bad query must not fail the others: each is answered alone
            if len(live) == 1:
                _settle(live[0][1], exception=exc)
            else:
                for waiting in live:
                    self._answer_alone(*waiting)
            return
        for (_, future), plans in zip(live, results, strict=True):
            _settle(future, plans)

    def _with_bases(self, batch: list[Waiting]) -> list[Waiting]:
        """The batch's queries with their common base, after failing those naming unknown checkpoints."""
        if not batch:
            return batch
        from models.plans import is_cross_family

        bases = self.bases({name for query, _ in batch for name in query.models})
        known = []
        for query, future in batch:
            missing = next((name for name in query.models if name not in bases), None)
            if missing is not None:
                _settle(future, exception=NotFoundError(f"{missing!r} is not a checkpoint in the catalog"))
                continue
            members = [bases[name] for name in query.models]
            shared = set(members)
            base = shared.pop() if len(shared) == 1 else None
            known.append((replace(query, base=base, cross_family=is_cross_family(members)), future))
        return known

    def _answer_alone(self, query: RecommendationQuery, future: asyncio.Future[Any]) -> None:
        try:
            _settle(future, self.selector.recommend_many([query])[0])
        except Exception as exc:
            _settle(future, exception=exc)


def _settle(
    future: asyncio.Future[Any], result: Any = None, *, exception: BaseException | None = None
) -> None:
    if future.done():  # the request was cancelled while its batch ran
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
