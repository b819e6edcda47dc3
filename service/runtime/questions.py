"""The work behind POST /ask, so that the route only translates HTTP: validate the request into an
`AskItem`, wait for its batch (or stream it token by token), time the wait, name the sources, and
report what happened to the observers the app wires in (metrics).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from service.models.llm import TextPieces
from service.runtime.ask import AskItem, AskResult, AskService, Prepared
from service.runtime.batcher import MicroBatcher
from service.runtime.decode_loop import DecodeLoop, Ticket
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


def _ms_since(t: float | None) -> float:
    return 0.0 if t is None else 1e3 * (time.perf_counter() - t)


@dataclass
class QuestionService:
    ask: AskService
    batcher: MicroBatcher[AskItem, AskResult] | MicroBatcher[AskItem, Prepared]
    """Whole answers in batches; with `decode`, the stages before generation (make_prepare_batcher)."""
    store: MemoryStore
    decode: DecodeLoop | None = None
    """Continuous batching: each question joins the running decode at the next token step."""
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
        if self.decode is None:
            result: AskResult = (await self.batcher.submit([item]))[0]
            generation, hits, stages = result.generation, result.sources, result.timings_ms
        else:
            prepared: Prepared = (await self.batcher.submit([item]))[0]
            ticket = self.decode.submit(prepared.prompt, prepared.prefix, item.generation)
            try:
                generation = await ticket.generation()
            finally:
                self.decode.cancel(ticket)  # a no-op once it finished; frees its rows if the caller went away
            hits, stages = prepared.sources, {**prepared.timings_ms, "generate": _ms_since(ticket.started_at)}
        total = 1e3 * (time.perf_counter() - start)
        # "queue": waiting for a batch slot (and the rest of a batch) — what the stages do not explain.
        timings = {**stages, "queue": max(0.0, total - sum(stages.values())), "total": total}
        self.on_answer(timings, len(generation.token_ids))
        sources = await run_in_threadpool(self.sources, hits)
        rounded = {k: round(v, 3) for k, v in timings.items()}
        return Answered(generation.text, generation.finish_reason, sources, rounded)

    async def stream(self, request: AskRequest) -> tuple[list[SourceRef], AsyncIterator[str]]:
        """The sources, then the answer's text pieces as they are generated. A client that goes away
        stops its decoding at the next token (its rows leave the continuous batch, or the thread-pool
        iteration of the batch path stops)."""
        item = self.item(request)
        start = time.perf_counter()
        if self.decode is not None:
            prepared: Prepared = (await self.batcher.submit([item]))[0]
            ticket = self.decode.submit(prepared.prompt, prepared.prefix, item.generation)
            return await run_in_threadpool(self.sources, prepared.sources), self._observed(self._pieces(ticket), start)
        hits, pieces = await run_in_threadpool(self.ask.stream_one, item)
        return await run_in_threadpool(self.sources, hits), self._observed(iterate_in_threadpool(pieces), start)

    async def _pieces(self, ticket: Ticket) -> AsyncIterator[str]:
        text = TextPieces(self.ask.engine.llm, ticket.config.stop_strings)
        try:
            async for token, _ in ticket.tokens():
                piece, finished = text.add(token)
                if piece:
                    yield piece
                if finished:
                    return
        finally:
            self.decode.cancel(ticket)

    async def _observed(self, pieces: AsyncIterator[str], start: float) -> AsyncIterator[str]:
        first = True
        async for piece in pieces:
            self.on_stream_token(time.perf_counter() - start if first else None)
            first = False
            yield piece

    def sources(self, hits: list[SearchHit]) -> list[SourceRef]:
        titles = self.store.get_docs_meta([h.id for h in hits], ["title"]) if hits else []
        return [
            SourceRef(h.id, (t[0] or None) if t else None, round(h.score, 6))
            for h, t in zip(hits, titles, strict=True)
        ]
