"""The Redis memory bank: documents, memories, an id set and an event stream, one bank per prefix.

Keys (``{bank}`` is a Redis Cluster hash tag: a bank lives in one slot, so the multi-key write
scripts are legal on a cluster)::

    cmt:v1:{bank}:doc:<id>   hash: id, text, hash, cv, version, received, [title, source, published]
    cmt:v1:{bank}:mem:<id>   string: codec.encode(memory, key, cv)
    cmt:v1:{bank}:ids        zset: id scored by first-receipt time (µs), for paging and scans
    cmt:v1:{bank}:cvcount    hash: compressor version -> number of documents (stale counts)
    cmt:v1:{bank}:events     stream (MAXLEN ~): op=put|delete, id; other replicas' indexes follow it
                             (reading it: redis_stream.py)

``v1`` versions the layout: a future layout change uses new keys instead of misreading old ones.
Timestamps are integer microseconds since the epoch (UTC).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Self

import torch

from service.errors import InvalidInputError, StorageUnavailableError
from service.storage import codec, scripts
from service.storage.base import (
    ChangeListener,
    DocumentInput,
    DocumentRecord,
    IndexEntry,
    MemoryWrite,
    OperationObserver,
    PutResult,
    StoredMemory,
    StreamEvent,
    content_hash,
    from_us,
    to_us,
    validate_id,
)
from service.storage.connection import ConnectionSettings, connect, guard, redact
from service.storage.redis_stream import StreamAndAdminMixin, decode_optional
from service.storage.replication import AckedWriter, ReplicaAcks, default_wait_replicas

log = logging.getLogger(__name__)
__all__ = ["ChangeListener", "RedisMemoryStore", "StreamEvent"]

KEY_LAYOUT_VERSION = "v1"


def _optional_script_arg(v: str | None) -> str:
    """An optional string field as the write scripts read it: "0" for None, "1" + the value otherwise."""
    return "0" if v is None else "1" + v


class RedisMemoryStore(StreamAndAdminMixin):
    """`MemoryStore` on Redis. Thread-safe (redis-py pools connections per thread of use).

    `on_operation` is told the name, duration and failure (or None) of every operation (metrics);
    `on_close` runs after the connection is closed (e.g. stops an embedded server). `replica_acks`:
    replicas that must have each write before it is acknowledged (replication.py); None = 1 on
    redis+cluster:// and redis+sentinel:// URLs, 0 otherwise.
    """

    def __init__(
        self,
        url: str,
        *,
        bank: str = "default",
        stream_maxlen: int = 100_000,
        max_batch: int = 256,
        settings: ConnectionSettings | None = None,
        client: Any | None = None,
        on_close: Callable[[], None] | None = None,
        on_operation: OperationObserver | None = None,
        replica_acks: ReplicaAcks | None = None,
    ) -> None:
        if not bank or any(c in bank for c in "{}: \n"):
            raise InvalidInputError(f"bank name {bank!r} must be non-empty without braces, colons or spaces")
        self.url = url
        self.bank = bank
        self.stream_maxlen = stream_maxlen
        self.max_batch = max_batch
        self._r = client if client is not None else connect(url, settings)
        self._prefix = f"cmt:{KEY_LAYOUT_VERSION}:{{{bank}}}:"
        self.ids_key = self._prefix + "ids"
        self.events_key = self._prefix + "events"
        self.cv_key = self._prefix + "cvcount"
        self._put = self._r.register_script(scripts.PUT)
        self._delete = self._r.register_script(scripts.DELETE)
        self._update = self._r.register_script(scripts.UPDATE_MEMORY)
        acks = replica_acks if replica_acks is not None else ReplicaAcks(default_wait_replicas(url))
        self._writer = AckedWriter(self._r, url, acks, self.ids_key)
        self._listeners: list[ChangeListener] = []
        self._listeners_lock = threading.Lock()
        self._on_close = on_close
        self._on_operation = on_operation
        self._prefix_guess = codec.HEADER_SIZE + 64 + 4 * 384

    # -- keys ------------------------------------------------------------------------------
    def doc_key(self, doc_id: str) -> str:
        return self._prefix + "doc:" + doc_id

    def mem_key(self, doc_id: str) -> str:
        return self._prefix + "mem:" + doc_id

    @contextlib.contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        """Every operation runs inside this: Redis failures become StorageUnavailableError, and the
        operation is reported to `on_operation`."""
        if self._on_operation is None:
            with guard(op, self.url):
                yield
            return
        start, error = time.perf_counter(), None
        try:
            with guard(op, self.url):
                yield
        except StorageUnavailableError as exc:
            error = exc
            raise
        finally:
            self._on_operation(op, time.perf_counter() - start, error)

    # -- listeners (same-process index sees writes immediately) -----------------------------
    def add_listener(self, fn: ChangeListener) -> None:
        with self._listeners_lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: ChangeListener) -> None:
        with self._listeners_lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _notify(self, puts: list[IndexEntry], deletes: list[str]) -> None:
        if not puts and not deletes:
            return
        with self._listeners_lock:
            listeners = list(self._listeners)
        for fn in listeners:
            fn(puts, deletes)

    # -- writes ------------------------------------------------------------------------------
    def put_many(
        self,
        items: Sequence[MemoryWrite | tuple[DocumentInput, codec.Memory, torch.Tensor]],
        compressor_version: str,
    ) -> list[PutResult]:
        """Store documents with their memories. All inputs are validated before anything is written.

        Each chunk of `max_batch` documents is one atomic script call; within it every document is
        all-or-nothing. With acknowledged writes on (replication.py) the chunks and one WAIT go in one
        pipeline to the bank's master, and the call returns only once the replicas have them (else 503).
        Same id + same text + same compressor version is "unchanged" (nothing rewritten, metadata
        included); a new text is "replaced" with version+1; same text under a new compressor version
        is "replaced" at the same version.
        """
        prepared: list[tuple[DocumentInput, bytes, IndexEntry]] = []
        for item in items:
            doc, memory, key = (item.doc, item.memory, item.key) if isinstance(item, MemoryWrite) else item
            if not isinstance(doc, DocumentInput):
                raise InvalidInputError("each item must be (DocumentInput, memory, key)")
            doc = doc.validated()
            try:
                value = codec.encode(codec.to_storable_memory(memory), key, compressor_version)
            except InvalidInputError as exc:
                raise InvalidInputError(f"document {doc.id!r}: {exc.message}") from exc
            entry = IndexEntry(
                id=doc.id,
                key=key.detach().to("cpu", torch.float32).numpy().copy(),  # (d_m,)
                compressor_version=compressor_version,
                source=doc.source,
                published_at=doc.published_at,
                received_at=doc.received_at,  # type: ignore[arg-type]  # set by validated()
            )
            prepared.append((doc, value, entry))
        chunks = [prepared[start : start + self.max_batch] for start in range(0, len(prepared), self.max_batch)]
        results: list[PutResult] = []

        def collect(n: int, out: list[Any]) -> None:  # one chunk written: its results, then the listeners
            written = []
            for i, (doc, value, entry) in enumerate(chunks[n]):
                status = out[2 * i].decode()
                results.append(PutResult(doc.id, status, int(out[2 * i + 1]), len(value)))  # type: ignore[arg-type]
                if status != "unchanged":
                    written.append(entry)
            self._notify(written, [])

        with self._guard("put_many"):
            self._writer.run("put_many", self._put, [self._put_call(c, compressor_version) for c in chunks], collect)
        return results

    def _put_call(
        self, chunk: list[tuple[DocumentInput, bytes, IndexEntry]], compressor_version: str
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of one PUT script call (scripts.py)."""
        keys = [self.ids_key, self.events_key, self.cv_key]
        args: list[Any] = [compressor_version, self.stream_maxlen, len(chunk)]
        for doc, value, _ in chunk:
            keys += [self.doc_key(doc.id), self.mem_key(doc.id)]
            pub = "" if doc.published_at is None else str(to_us(doc.published_at))
            args += [doc.id, content_hash(doc.text), doc.text,
                     _optional_script_arg(doc.title), _optional_script_arg(doc.source),
                     pub, str(to_us(doc.received_at)), value]  # type: ignore[arg-type]
        return keys, args

    def delete(self, doc_id: str) -> bool:
        """Remove the document and its memory atomically; False if it was not stored."""
        return self.delete_many([doc_id])[0]

    def delete_many(self, ids: Sequence[str]) -> list[bool]:
        ids = [validate_id(i) for i in ids]
        if not ids:
            return []
        keys = [self.ids_key, self.events_key, self.cv_key]
        for i in ids:
            keys += [self.doc_key(i), self.mem_key(i)]
        existed: list[bool] = []

        def collect(_: int, out: list[Any]) -> None:
            existed.extend(bool(x) for x in out)
            self._notify([], [i for i, e in zip(ids, existed, strict=True) if e])

        with self._guard("delete"):
            self._writer.run("delete", self._delete, [(keys, [self.stream_maxlen, len(ids), *ids])], collect)
        return existed

    def update_memories(
        self,
        items: Sequence[tuple[str, str, codec.Memory, torch.Tensor]],
        compressor_version: str,
    ) -> list[str]:
        """Replace memories of existing docs (reindex): items are (id, expected content hash, memory, key).

        Returns per item "updated", "gone" (deleted meanwhile) or "changed" (text edited meanwhile;
        the new text's own put already stored a fresh memory, so this one is dropped).
        """
        chunks = [items[start : start + self.max_batch] for start in range(0, len(items), self.max_batch)]
        calls = []
        for chunk in chunks:
            keys = [self.ids_key, self.events_key, self.cv_key]
            args: list[Any] = [compressor_version, self.stream_maxlen, len(chunk)]
            for doc_id, h, memory, key in chunk:
                keys += [self.doc_key(doc_id), self.mem_key(doc_id)]
                args += [doc_id, h, codec.encode(codec.to_storable_memory(memory), key, compressor_version)]
            calls.append((keys, args))
        statuses: list[str] = []

        def collect(n: int, raw: list[bytes]) -> None:
            out = [x.decode() for x in raw]
            statuses.extend(out)
            updated = [c[0] for c, st in zip(chunks[n], out, strict=True) if st == "updated"]
            if updated:
                self._notify([e for e in self.fetch_index_entries(updated).values() if e is not None], [])

        with self._guard("update_memories"):
            self._writer.run("update_memories", self._update, calls, collect)
        return statuses

    # -- reads -------------------------------------------------------------------------------
    @staticmethod
    def _record(h: dict[bytes, bytes]) -> DocumentRecord | None:
        if not h or b"id" not in h:
            return None
        pub = h.get(b"published")
        return DocumentRecord(
            id=h[b"id"].decode(),
            text=h[b"text"].decode(),
            title=decode_optional(h.get(b"title")),
            source=decode_optional(h.get(b"source")),
            published_at=None if pub is None else from_us(int(pub)),
            received_at=from_us(int(h[b"received"])),
            content_hash=h[b"hash"].decode(),
            version=int(h[b"version"]),
            compressor_version=h[b"cv"].decode(),
        )

    def get(self, doc_id: str) -> DocumentRecord | None:
        validate_id(doc_id)
        with self._guard("get"):
            h = self._r.hgetall(self.doc_key(doc_id))
        return self._record(h)

    def get_memories(
        self, ids: Sequence[str], *, compressor_version: str | None = None, stale: Literal["miss", "raise"] = "miss"
    ) -> list[StoredMemory | None]:
        """Memories in the order of `ids` with one MGET. A missing id gives None.

        With `compressor_version`, a memory made by another version is never returned: it is a
        miss (`stale="miss"`, the default) or raises StaleMemoryError (`stale="raise"`).
        """
        if not ids:
            return []
        with self._guard("get_memories"):
            values = self._r.mget([self.mem_key(i) for i in ids])
        out: list[StoredMemory | None] = []
        for doc_id, value in zip(ids, values, strict=True):
            if value is None:
                out.append(None)
                continue
            memory, key, cv = codec.decode(value)  # (k, d_m) or TokenPicks (k, m), (d_k,)
            if compressor_version is not None and cv != compressor_version:
                if stale == "raise":
                    from service.errors import StaleMemoryError

                    raise StaleMemoryError(
                        f"memory of {doc_id!r} was made by compressor {cv!r}, serving {compressor_version!r}; "
                        "run the reindex command",
                        details={"id": doc_id, "stored": cv, "serving": compressor_version},
                    )
                out.append(None)
                continue
            out.append(StoredMemory(doc_id, memory, key, cv))
        return out

    def count(self) -> int:
        with self._guard("count"):
            return int(self._r.zcard(self.ids_key))

    def list(self, offset: int = 0, limit: int = 100) -> list[DocumentRecord]:
        """Documents in order of first receipt (two round trips: ids, then one pipeline)."""
        if offset < 0 or limit < 0:
            raise InvalidInputError("offset and limit must be >= 0")
        if limit == 0:
            return []
        with self._guard("list"):
            ids = self._r.zrange(self.ids_key, offset, offset + limit - 1)
            pipe = self._r.pipeline(transaction=False)
            for i in ids:
                pipe.hgetall(self.doc_key(i.decode()))
            rows = pipe.execute()
        return [r for r in (self._record(h) for h in rows) if r is not None]

    def ping(self) -> bool:
        with self._guard("ping"):
            return bool(self._r.ping())

    # -- index support (fetch_index_entries: redis_stream.py) ------------------------------------
    def get_docs_meta(self, ids: Sequence[str], fields: Sequence[str]) -> list[list[str | None]]:
        """Selected hash fields of several docs (None where absent), one pipeline: reindex, ingest, /ask sources."""
        with self._guard("get_docs_meta"):
            pipe = self._r.pipeline(transaction=False)
            for i in ids:
                pipe.hmget(self.doc_key(i), list(fields))
            rows = pipe.execute()
        return [[decode_optional(v) for v in row] for row in rows]

    def close(self) -> None:
        try:
            self._r.close()
        finally:
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisMemoryStore(url={redact(self.url)!r}, bank={self.bank!r})"
