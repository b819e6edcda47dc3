"""The work behind POST /ask, so that the route only translates HTTP: validate the request into an
`AskItem`, wait for its batch (or stream it token by token), time the wait, name the sources, and
report what happened to the observers the app wires in (metrics).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from service.runtime.ask import AskItem, AskResult, AskService
from service.runtime.batcher import MicroBatcher
from service.storage.base import MemoryStore, SearchFilters
from service.storage.index import SearchHit


@dataclass(frozen=True)
class AskRequest:
    """One question as a client sends it; None = the checkpoint's or the settings' default."""

    question: str
    top_k: int | None = None
    max_new_tokens: int | None = None
    alpha: float | None = None
    temperature: float | None = None
    """Sample at this temperature; greedy when None."""
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] | None = None
    recency_margin: float | None = None
    filters: SearchFilters | None = None


@dataclass(frozen=True)
class SourceRef:
    id: str
    title: str | None
    score: float


@dataclass
class Answered:
    answer: str
    finish_reason: str
    sources: list[SourceRef]
    timings_ms: dict[str, float] = field(default_factory=dict)
    """Per stage (encode, retrieve, fetch, aggregate, align, generate), queue and total."""


def _ignore(*_: object) -> None:
    return None


@dataclass
class QuestionService:
    ask: AskService
    batcher: MicroBatcher[AskItem, AskResult]
    store: MemoryStore
    on_answer: Callable[[dict[str, float], int], None] = _ignore
    """Called with an answered question's timings (ms, "total" included) and its generated tokens."""
    on_stream_token: Callable[[float | None], None] = _ignore
    """Called per streamed piece with the seconds to it for the first piece, else None."""

    def item(self, request: AskRequest) -> AskItem:
        """The request checked against the limits (clear 4xx errors) as the batcher's work item."""
        sampling = {"do_sample": request.temperature is not None, "temperature": request.temperature or 1.0,
                    "top_p": request.top_p, "seed": request.seed, "stop_strings": tuple(request.stop or ())}
        return self.ask.item(request.question, request.top_k, request.max_new_tokens, request.alpha,
                             request.filters or SearchFilters(), recency_margin=request.recency_margin, **sampling)

    async def answer(self, request: AskRequest) -> Answered:
        item = self.item(request)
        start = time.perf_counter()
        result = (await self.batcher.submit([item]))[0]
        total = 1e3 * (time.perf_counter() - start)
        # "queue": waiting for a batch slot (and the rest of a batch) — what the stages do not explain.
        timings = {**result.timings_ms, "queue": max(0.0, total - sum(result.timings_ms.values())), "total": total}
        self.on_answer(timings, len(result.generation.token_ids))
        sources = await run_in_threadpool(self.sources, result.sources)
        return Answered(result.generation.text, result.generation.finish_reason, sources,
                        {k: round(v, 3) for k, v in timings.items()})

    async def stream(self, request: AskRequest) -> tuple[list[SourceRef], AsyncIterator[str]]:
        """The sources, then the answer's text pieces as they are generated. The decode loop runs in
        the thread pool one piece per step, so a client that goes away stops it at the next token."""
        item = self.item(request)
        start = time.perf_counter()
        hits, pieces = await run_in_threadpool(self.ask.stream_one, item)
        sources = await run_in_threadpool(self.sources, hits)

        async def observed() -> AsyncIterator[str]:
            first = True
            async for piece in iterate_in_threadpool(pieces):
                self.on_stream_token(time.perf_counter() - start if first else None)
                first = False
                yield piece

        return sources, observed()

    def sources(self, hits: list[SearchHit]) -> list[SourceRef]:
        titles = self.store.get_docs_meta([h.id for h in hits], ["title"]) if hits else []
        return [
            SourceRef(h.id, (t[0] or None) if t else None, round(h.score, 6))
            for h, t in zip(hits, titles, strict=True)
        ]
