"""Typed dependencies of the routes: the app's services and API-key checks."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from service.runtime.ingest import IngestService
from service.runtime.questions import QuestionService
from service.runtime.state import AppState
from service.storage.base import MemoryStore


def get_state(request: Request) -> AppState:
    return request.app.state.cmt


State = Annotated[AppState, Depends(get_state)]


def get_questions(state: State) -> QuestionService:
    return state.questions


def get_ingest(state: State) -> IngestService:
    return state.ingest


def get_store(state: State) -> MemoryStore:
    return state.store


AskDep = Annotated[QuestionService, Depends(get_questions)]
IngestDep = Annotated[IngestService, Depends(get_ingest)]
StoreDep = Annotated[MemoryStore, Depends(get_store)]


def _presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def _accepts(presented: str | None, keys) -> bool:
    if presented is None:
        return False
    # Compare against every key (no early exit) in constant time per key.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented.encode(), key.get_secret_value().encode())
    return ok


def require_write_key(
    state: State,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    keys = state.settings.api_keys
    if keys and not _accepts(_presented_key(authorization, x_api_key), keys):
        raise HTTPException(401, "a valid API key is required for writes (Authorization: Bearer <key> or X-API-Key)")


def require_read_key(
    state: State,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    keys = state.settings.read_api_keys
    if keys and not _accepts(_presented_key(authorization, x_api_key), [*keys, *state.settings.api_keys]):
        raise HTTPException(401, "a valid API key is required (Authorization: Bearer <key> or X-API-Key)")
