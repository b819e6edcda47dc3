"""Thin routes: parse, call a service, shape the response."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from service.api.deps import State, require_read_key, require_write_key
from service.api.schemas import (
    AskIn, AskOut, DocumentList, DocumentOut, DocumentResult, DocumentsIn, DocumentsOut, DocumentSummary,
    ErrorOut, Source,
)
from service.errors import NotFoundError
from service.storage.base import DocumentInput, SearchFilters

ERRORS = {code: {"model": ErrorOut} for code in (401, 404, 413, 422, 429, 500, 503)}
router = APIRouter(responses=ERRORS)


@router.post("/documents", response_model=DocumentsOut, dependencies=[Depends(require_write_key)])
async def post_documents(body: DocumentsIn, state: State) -> DocumentsOut:
    docs = [
        DocumentInput(id=d.id or uuid.uuid4().hex, text=d.text, title=d.title, source=d.source, published_at=d.published_at)
        for d in body.documents
    ]
    state.metrics.ingest_received.inc(len(docs))
    try:
        results = await state.ingest.ingest(docs)
    except Exception:
        state.metrics.documents.labels("rejected").inc(len(docs))
        raise
    for r in results:
        state.metrics.documents.labels(r.status).inc()
    return DocumentsOut(documents=[DocumentResult(id=r.id, status=r.status, version=r.version, memory_bytes=r.memory_bytes) for r in results])


@router.get("/documents", response_model=DocumentList, dependencies=[Depends(require_read_key)])
async def list_documents(
    state: State,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DocumentList:
    count = await run_in_threadpool(state.store.count)
    records = await run_in_threadpool(state.store.list, offset, limit)
    docs = [
        DocumentSummary(id=r.id, title=r.title, source=r.source, published_at=r.published_at, received_at=r.received_at, version=r.version)
        for r in records
    ]
    return DocumentList(count=count, offset=offset, limit=limit, documents=docs)


@router.get("/documents/{doc_id}", response_model=DocumentOut, dependencies=[Depends(require_read_key)])
async def get_document(doc_id: str, state: State) -> DocumentOut:
    record = await run_in_threadpool(state.store.get, doc_id)
    if record is None:
        raise NotFoundError(f"no document with id {doc_id!r}")
    return DocumentOut(
        id=record.id, text=record.text, title=record.title, source=record.source, published_at=record.published_at,
        received_at=record.received_at, version=record.version, compressor_version=record.compressor_version,
    )


@router.delete("/documents/{doc_id}", dependencies=[Depends(require_write_key)])
async def delete_document(doc_id: str, state: State) -> dict:
    if not await run_in_threadpool(state.store.delete, doc_id):
        raise NotFoundError(f"no document with id {doc_id!r}")
    return {"id": doc_id, "deleted": True}


def _sources(state, hits) -> list[Source]:
    titles = state.store.get_docs_meta([h.id for h in hits], ["title"]) if hits else []
    return [Source(id=h.id, title=(t[0] or None) if t else None, score=round(h.score, 6)) for h, t in zip(hits, titles)]


@router.post("/ask", response_model=AskOut, dependencies=[Depends(require_read_key)])
async def ask(body: AskIn, state: State):
    filters = body.filters or SearchFilters()
    sampling = {"do_sample": body.temperature is not None, "temperature": body.temperature or 1.0, "top_p": body.top_p, "seed": body.seed,
                "stop_strings": tuple(body.stop or ())}
    item = state.ask.item(body.question, body.top_k, body.max_new_tokens, body.alpha, filters,
                          recency_margin=body.recency_margin, **sampling)
    if body.stream:
        return await _stream(state, item)
    start = time.perf_counter()
    result = (await state.ask_batcher.submit([item]))[0]
    state.metrics.tokens_generated.labels("batch").inc(len(result.generation.token_ids))
    total = 1e3 * (time.perf_counter() - start)
    # "queue": waiting for a batch slot (and the rest of a batch) — what the stages do not explain.
    timings = {**result.timings_ms, "queue": max(0.0, total - sum(result.timings_ms.values())), "total": total}
    for stage, ms in timings.items():
        if stage != "total":
            state.metrics.ask_stage.labels(stage).observe(ms / 1e3)
    sources = await run_in_threadpool(_sources, state, result.sources)
    return AskOut(answer=result.generation.text, finish_reason=result.generation.finish_reason, sources=sources,
                  timings_ms={k: round(v, 3) for k, v in timings.items()})


async def _stream(state, item) -> StreamingResponse:
    """Server-sent events: `sources`, then `token` events, then `done` (or `error`)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    start, m = time.perf_counter(), state.metrics
    hits, pieces = await run_in_threadpool(state.ask.stream_one, item)
    sources = await run_in_threadpool(_sources, state, hits)

    def produce() -> None:
        try:
            for n, piece in enumerate(pieces):
                if n == 0:
                    m.ask_ttft.observe(time.perf_counter() - start)
                m.tokens_generated.labels("stream").inc()
                loop.call_soon_threadsafe(queue.put_nowait, ("token", {"text": piece}))
            loop.call_soon_threadsafe(queue.put_nowait, ("done", {}))
        except Exception as exc:  # noqa: BLE001 - reported to the client as an SSE error event
            loop.call_soon_threadsafe(queue.put_nowait, ("error", {"code": "model_error", "message": str(exc)}))

    async def events():
        yield _sse("sources", {"sources": [s.model_dump() for s in sources]})
        threading.Thread(target=produce, daemon=True).start()
        while True:
            event, data = await queue.get()
            yield _sse(event, data)
            if event in ("done", "error"):
                return

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    cv = state.engine.compressor_version
    # Stale = memories made by another compressor: never served, waiting for `cmt-reindex`.
    checks = {"models": True, "redis": True, "index_documents": len(state.index),
              "stale_documents": state.index.stale_count(cv)}
    try:
        await run_in_threadpool(state.store.ping)
    except Exception:  # noqa: BLE001 - any failure means not ready
        checks["redis"] = False
    ready = checks["models"] and checks["redis"]
    return JSONResponse({"ready": ready, "checks": checks, "compressor_version": cv},
                        status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> PlainTextResponse:
    # Off the event loop: scrape-time gauges may read Redis (bank statistics, cached).
    return PlainTextResponse(await run_in_threadpool(state.metrics.render), media_type=CONTENT_TYPE_LATEST)
