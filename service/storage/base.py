"""Records, the search filter and the storage interface the rest of the service codes against.

The interface is small (LMCache-style): put a batch, get one, get many memories in one round
trip, delete, list/count, bank statistics, and what keeping an index in step needs (scan, change
listeners, the event stream). A missing document is a documented miss (`None` from
`get`/`get_memories`, `False` from `delete`), never a crash; every storage fault is a
`StorageUnavailableError` (503), every bad input an `InvalidInputError` (422).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, Self, runtime_checkable

import numpy as np
import torch
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from service.errors import InvalidInputError, StorageUnavailableError
from service.storage.codec import Memory

PutStatus = Literal["new", "unchanged", "replaced"]
MAX_ID_BYTES = 512


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def to_us(ts: datetime) -> int:
    """Microseconds since the epoch: how timestamps are stored (exact, sortable integers)."""
    return (ts - _EPOCH) // _US


def from_us(us: int) -> datetime:
    return _EPOCH + int(us) * _US


def utc_now() -> datetime:
    return datetime.now(UTC)


def content_hash(text: str) -> str:
    """sha256 of the UTF-8 text: decides idempotency (same id + same hash = no rewrite)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def ensure_utc(value: datetime | None, name: str) -> datetime | None:
    """Timestamps must be timezone-aware; they are normalised to UTC (naive is ambiguous)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInputError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInputError(f"{name} must be timezone-aware (e.g. 2024-02-01T00:00:00Z)")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+00:05 is in year 0 in UTC
        raise InvalidInputError(f"{name} {value.isoformat()} is outside years 1-9999 in UTC") from None


def validate_id(doc_id: str) -> str:
    if not isinstance(doc_id, str) or not doc_id:
        raise InvalidInputError("document id must be a non-empty string")
    if len(doc_id.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidInputError(f"document id longer than {MAX_ID_BYTES} bytes")
    if any(ch in doc_id for ch in "\x00\r\n"):
        raise InvalidInputError("document id must not contain NUL or newline characters")
    return doc_id


@dataclass(frozen=True)
class DocumentInput:
    """A document as the caller submits it (no version: the store assigns it)."""

    id: str
    text: str
    title: str | None = None
    source: str | None = None
    published_at: datetime | None = None
    received_at: datetime | None = None  # None: the store stamps the time of the write

    def validated(self) -> DocumentInput:
        validate_id(self.id)
        if not isinstance(self.text, str) or not self.text.strip():
            raise InvalidInputError(f"document {self.id!r}: text must be a non-empty string")
        for name in ("title", "source"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise InvalidInputError(f"document {self.id!r}: {name} must be a string or null")
        return DocumentInput(
            id=self.id,
            text=self.text,
            title=self.title,
            source=self.source,
            published_at=ensure_utc(self.published_at, "published_at"),
            received_at=ensure_utc(self.received_at, "received_at") or utc_now(),
        )


@dataclass(frozen=True)
class DocumentRecord:
    """A stored document: what `get` returns (text included; the memory is separate)."""

    id: str
    text: str
    title: str | None
    source: str | None
    published_at: datetime | None  # tz-aware UTC
    received_at: datetime  # tz-aware UTC
    content_hash: str
    version: int  # 1 on first write, +1 each time the text changes
    compressor_version: str


@dataclass(frozen=True)
class StoredMemory:
    """One document's memory as read back: bit-exact with what was written."""

    doc_id: str
    memory: Memory  # (k, d_m) fp16 (or bf16 if written as bf16), or TokenPicks (k, m) if written so
    key: torch.Tensor  # (d_k,) fp32 (stored as fp16 or fp32: see codec.py)
    compressor_version: str


@dataclass(frozen=True)
class MemoryWrite:
    """One item of `put_many`: the document and the memory Θ made of it."""

    doc: DocumentInput
    memory: Memory  # (k, d_m), or TokenPicks (k, m)
    key: torch.Tensor  # (d_k,)


@dataclass(frozen=True)
class PutResult:
    id: str
    status: PutStatus  # new | unchanged (no rewrite) | replaced (text or compressor changed)
    version: int
    memory_bytes: int  # size of the stored memory value


@dataclass(frozen=True)
class IndexEntry:
    """What the in-process index keeps per document (no text, no memory)."""

    id: str
    key: np.ndarray = field(repr=False)  # (d_k,) float32, as stored (not normalised)
    compressor_version: str
    source: str | None
    published_at: datetime | None
    received_at: datetime


class SearchFilters(BaseModel):
    """Which documents a search may return: the `filters` of POST /ask, passed as is to the index.

    Every field left None restricts nothing. `published_from <= published_at < published_to`;
    with either bound set, documents without `published_at` are excluded.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: tuple[str, ...] | None = Field(None, min_length=1, description="Only documents from these sources")
    published_from: AwareDatetime | None = None
    published_to: AwareDatetime | None = None


@dataclass(frozen=True)
class BankStats:
    """Size of a bank as `MemoryStore.bank_stats` reads it (the `cmt_bank_*` gauges)."""

    documents: int
    memories_by_version: dict[str, int]
    memory_bytes: int
    text_bytes: int
    text_sampled: int  # documents whose text length was read (== documents: exact)


@dataclass(frozen=True)
class StreamEvent:
    """One entry of a bank's event stream: a document was written or deleted (by any replica)."""

    entry_id: str
    op: str  # "put" | "delete"
    doc_id: str


@dataclass(frozen=True)
class StreamPosition:
    """Where a bank's event stream stands: its newest entry, and how many entries were ever added
    (`entries_added - length` were trimmed: a follower behind that many missed events)."""

    last_id: str
    entries_added: int
    length: int


# A listener gets (entries written, ids deleted) after each successful write through this store.
ChangeListener = Callable[[list[IndexEntry], list[str]], None]
# Told (operation, seconds, the failure or None) after every store operation: how metrics time
# Redis without reaching into the store.
OperationObserver = Callable[[str, float, StorageUnavailableError | None], None]
BLOCKING_OPS = frozenset({"read_events"})
"""Operations that wait by design (the follower's blocking read): their seconds include the wait."""


@runtime_checkable
class MemoryStore(Protocol):
    """The storage interface. Implementations: `RedisMemoryStore`."""

    bank: str  # name of the bank (namespace) inside the backend

    # -- documents and memories ------------------------------------------------------------------
    def put_many(
        self, items: Sequence[MemoryWrite | tuple[DocumentInput, Memory, torch.Tensor]], compressor_version: str
    ) -> list[PutResult]:
        """Write a batch atomically (all-or-nothing per document) in one round trip."""
        ...

    def get(self, doc_id: str) -> DocumentRecord | None:
        """The stored document, or None if there is none."""
        ...

    def get_memories(
        self, ids: Sequence[str], *, compressor_version: str | None = None, stale: Literal["miss", "raise"] = "miss"
    ) -> list[StoredMemory | None]:
        """Memories in the order of `ids`, one round trip; None for a miss (or a stale version)."""
        ...

    def get_docs_meta(self, ids: Sequence[str], fields: Sequence[str]) -> list[list[str | None]]:
        """Selected stored fields (hash, cv, version, title, text...) of several documents, one round trip."""
        ...

    def update_memories(
        self, items: Sequence[tuple[str, str, Memory, torch.Tensor]], compressor_version: str
    ) -> list[str]:
        """Replace memories of (id, expected content hash, memory, key): "updated", "gone" or "changed"."""
        ...

    def delete(self, doc_id: str) -> bool:
        """Remove a document and its memory atomically; False if it was not stored."""
        ...

    def list(self, offset: int = 0, limit: int = 100) -> list[DocumentRecord]:
        """Documents in order of first receipt, paged."""
        ...

    def count(self) -> int: ...

    # -- statistics ------------------------------------------------------------------------------
    def version_counts(self) -> dict[str, int]:
        """Documents per compressor version."""
        ...

    def stale_count(self, compressor_version: str) -> int:
        """Documents whose memory was made by another compressor version."""
        ...

    def bank_stats(self, memory_size: Callable[[str], int], sample: int = 256) -> BankStats:
        """Documents, memories per version, memory bytes (count × `memory_size(version)`), text bytes."""
        ...

    # -- keeping an index in step ----------------------------------------------------------------
    def iter_ids(self, batch_size: int = 1000) -> Iterator[list[str]]:
        """Every stored id, in batches."""
        ...

    def iter_index_entries(self, batch_size: int = 1000) -> Iterator[list[IndexEntry]]:
        """Every stored document's index entry, in batches (index rebuild)."""
        ...

    def fetch_index_entries(self, ids: Sequence[str]) -> dict[str, IndexEntry | None]:
        """Current index entry of each id (None if not stored)."""
        ...

    def add_listener(self, fn: ChangeListener) -> None:
        """Call `fn` after every write through this store object."""
        ...

    def remove_listener(self, fn: ChangeListener) -> None: ...

    def stream_position(self) -> StreamPosition | None:
        """Where the bank's event stream stands (None before its first event)."""
        ...

    def read_events(self, after_id: str, *, count: int = 1000, block_ms: int | None = None) -> list[StreamEvent]:
        """Events newer than `after_id` (blocks up to `block_ms` if given and none yet)."""
        ...

    # -- lifecycle -------------------------------------------------------------------------------
    def ping(self) -> bool:
        """True if the backend answers; raises StorageUnavailableError otherwise."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: Any) -> None: ...


__all__ = [
    "BLOCKING_OPS",
    "BankStats",
    "ChangeListener",
    "DocumentInput",
    "DocumentRecord",
    "IndexEntry",
    "MemoryStore",
    "MemoryWrite",
    "OperationObserver",
    "PutResult",
    "PutStatus",
    "SearchFilters",
    "StoredMemory",
    "StreamEvent",
    "StreamPosition",
    "content_hash",
    "ensure_utc",
    "from_us",
    "to_us",
    "utc_now",
    "validate_id",
]
