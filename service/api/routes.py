"""Thin routes: parse, call a service, shape the response."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from service.api.deps import AskDep, IngestDep, State, StoreDep, require_read_key, require_write_key
from service.api.schemas import (
    AskIn,
    AskOut,
    DocumentList,
    DocumentOut,
    DocumentResult,
    DocumentsIn,
    DocumentsOut,
    DocumentSummary,
    ErrorOut,
    Source,
)
from service.errors import NotFoundError
from service.runtime.questions import AskRequest, SourceRef
from service.storage.base import DocumentInput

ERRORS = {code: {"model": ErrorOut} for code in (401, 404, 413, 422, 429, 500, 503)}
router = APIRouter(responses=ERRORS)


@router.post("/documents", response_model=DocumentsOut, dependencies=[Depends(require_write_key)])
async def post_documents(body: DocumentsIn, ingest: IngestDep) -> DocumentsOut:
    docs = [DocumentInput(**{**dict(d), "id": d.id or ""}) for d in body.documents]  # "" = the service names it
    results = await ingest.ingest(docs)
    return DocumentsOut(documents=[DocumentResult.model_validate(r, from_attributes=True) for r in results])


@router.get("/documents", response_model=DocumentList, dependencies=[Depends(require_read_key)])
async def list_documents(
    store: StoreDep,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DocumentList:
    count = await run_in_threadpool(store.count)
    records = await run_in_threadpool(store.list, offset, limit)
    docs = [DocumentSummary.model_validate(r, from_attributes=True) for r in records]
    return DocumentList(count=count, offset=offset, limit=limit, documents=docs)


@router.get("/documents/{doc_id}", response_model=DocumentOut, dependencies=[Depends(require_read_key)])
async def get_document(doc_id: str, store: StoreDep) -> DocumentOut:
    record = await run_in_threadpool(store.get, doc_id)
    if record is None:
        raise NotFoundError(f"no document with id {doc_id!r}")
    return DocumentOut.model_validate(record, from_attributes=True)


@router.delete("/documents/{doc_id}", dependencies=[Depends(require_write_key)])
async def delete_document(doc_id: str, store: StoreDep) -> dict:
    if not await run_in_threadpool(store.delete, doc_id):
        raise NotFoundError(f"no document with id {doc_id!r}")
    return {"id": doc_id, "deleted": True}


@router.post("/ask", response_model=AskOut, dependencies=[Depends(require_read_key)])
async def ask(body: AskIn, questions: AskDep):
    fields = dict(body)
    request = AskRequest(**{k: v for k, v in fields.items() if k != "stream"})
    if not body.stream:
        return AskOut.model_validate(await questions.answer(request), from_attributes=True)
    sources, pieces = await questions.stream(request)
    return StreamingResponse(
        _events(sources, pieces), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _events(sources: list[SourceRef], pieces: AsyncIterator[str]) -> AsyncIterator[str]:
    """Server-sent events: `sources`, then `token` events, then `done` (or `error`)."""
    yield _sse("sources", {"sources": [Source.model_validate(s, from_attributes=True).model_dump() for s in sources]})
    try:
        async for piece in pieces:
            yield _sse("token", {"text": piece})
    except Exception as exc:  # noqa: BLE001 - the response has started: reported to the client as an SSE event
        yield _sse("error", {"code": "model_error", "message": str(exc)})
        return
    yield _sse("done", {})


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    report = await state.readiness()
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> PlainTextResponse:
    # Off the event loop: scrape-time gauges may read Redis (bank statistics, cached).
    return PlainTextResponse(await run_in_threadpool(state.metrics.render), media_type=CONTENT_TYPE_LATEST)
