"""Request and response bodies (pydantic v2); the OpenAPI schema at /docs is generated from these."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from service.storage.base import SearchFilters


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DocumentIn(Strict):
    id: str | None = Field(None, min_length=1, max_length=512, description="Generated when absent")
    text: str = Field(min_length=1)
    title: str | None = Field(None, max_length=1_000)
    source: str | None = Field(None, max_length=200)
    published_at: AwareDatetime | None = Field(None, description="ISO 8601 with a time zone, e.g. 2024-02-01T08:00:00Z")


class DocumentsIn(Strict):
    documents: list[DocumentIn] = Field(min_length=1)


class DocumentResult(BaseModel):
    id: str
    status: Literal["new", "unchanged", "replaced"]
    version: int
    memory_bytes: int


class DocumentsOut(BaseModel):
    documents: list[DocumentResult]


class DocumentOut(BaseModel):
    id: str
    text: str
    title: str | None
    source: str | None
    published_at: datetime | None
    received_at: datetime
    version: int
    compressor_version: str


class DocumentSummary(BaseModel):
    id: str
    title: str | None
    source: str | None
    published_at: datetime | None
    received_at: datetime
    version: int


class DocumentList(BaseModel):
    count: int
    offset: int
    limit: int
    documents: list[DocumentSummary]


class AskIn(Strict):
    question: str = Field(min_length=1)
    top_k: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    alpha: float | None = Field(
        None, ge=0.0, le=10.0,
        description="Memory-aware decoding weight; default: the α the checkpoint was trained with",
    )
    temperature: float | None = Field(
        None, ge=0.01, le=5.0, description="Sample at this temperature; greedy when absent"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=32)]] | None = Field(
        None, max_length=4,
        description='Generation stops at the first of these strings (e.g. ["\\n"]); the answer excludes it',
    )
    filters: SearchFilters | None = None
    recency_margin: float | None = Field(
        None, ge=0.0, le=2.0,
        description="Prefer newer reports: each pick is the newest document scoring within this margin of the best "
                    "one left (a later report supersedes an earlier one on the same fact); 0 = by score alone; "
                    "default: the checkpoint's",
    )
    stream: bool = False


class Source(BaseModel):
    id: str
    title: str | None
    score: float


class AskOut(BaseModel):
    answer: str
    finish_reason: str
    sources: list[Source]
    timings_ms: dict[str, float]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict | list | None = None


class ErrorOut(BaseModel):
    error: ErrorBody
