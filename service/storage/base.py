"""Records and the small storage interface the rest of the service codes against.

The interface is deliberately small (LMCache-style): put a batch, get one, get many memories in
one round trip, delete, list/count, iterate for index rebuild, ping. A missing document is a
documented miss (`None` from `get`/`get_memories`, `False` from `delete`), never a crash; every
storage fault is a `StorageUnavailableError` (503), every bad input an `InvalidInputError` (422).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch

from service.errors import InvalidInputError

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
    return value.astimezone(UTC)


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
    memory: torch.Tensor  # (k, d_m) fp16 (or bf16 if written as bf16)
    key: torch.Tensor  # (d_m,) fp32
    compressor_version: str


@dataclass(frozen=True)
class MemoryWrite:
    """One item of `put_many`: the document and the memory Θ made of it."""

    doc: DocumentInput
    memory: torch.Tensor  # (k, d_m)
    key: torch.Tensor  # (d_m,)


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
    key: np.ndarray = field(repr=False)  # (d_m,) float32, as stored (not normalised)
    compressor_version: str
    source: str | None
    published_at: datetime | None
    received_at: datetime


@runtime_checkable
class MemoryStore(Protocol):
    """The storage interface. Implementations: `RedisMemoryStore`."""

    def put_many(
        self, items: Sequence[MemoryWrite | tuple[DocumentInput, torch.Tensor, torch.Tensor]], compressor_version: str
    ) -> list[PutResult]:
        """Write a batch atomically (all-or-nothing per document) in one round trip."""
        ...

    def get(self, doc_id: str) -> DocumentRecord | None:
        """The stored document, or None if there is none."""
        ...

    def get_memories(
        self, ids: Sequence[str], *, compressor_version: str | None = None
    ) -> list[StoredMemory | None]:
        """Memories in the order of `ids`, one round trip; None for a miss (or a stale version)."""
        ...

    def delete(self, doc_id: str) -> bool:
        """Remove a document and its memory atomically; False if it was not stored."""
        ...

    def list(self, offset: int = 0, limit: int = 100) -> list[DocumentRecord]:
        """Documents in order of first receipt, paged."""
        ...

    def count(self) -> int: ...

    def iter_index_entries(self, batch_size: int = 1000) -> Iterator[list[IndexEntry]]:
        """Every stored document's index entry, in batches (index rebuild)."""
        ...

    def ping(self) -> bool:
        """True if the backend answers; raises StorageUnavailableError otherwise."""
        ...

    def close(self) -> None: ...


__all__ = [
    "DocumentInput",
    "DocumentRecord",
    "IndexEntry",
    "MemoryStore",
    "MemoryWrite",
    "PutResult",
    "PutStatus",
    "StoredMemory",
    "content_hash",
    "ensure_utc",
    "from_us",
    "to_us",
    "utc_now",
    "validate_id",
]
