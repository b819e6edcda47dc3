"""Scans, index entries and the bank's event stream (what keeps replicas' indexes in step), bank statistics, admin.

A mixin of `RedisMemoryStore`, split out to keep modules small; it uses the store's client
(`_r`), key names and error guard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from service.storage import codec
from service.storage.base import BankStats, IndexEntry, StreamEvent, StreamPosition, from_us

_META_FIELDS = (b"cv", b"source", b"published", b"received")


def decode_optional(b: bytes | None) -> str | None:
    """A hash field as read back: None when absent, else its UTF-8 text."""
    return None if b is None else b.decode("utf-8")


class StreamAndAdminMixin:
    _r: Any
    events_key: str
    ids_key: str
    cv_key: str
    _prefix_guess: int  # bytes of a memory value's prefix read by GETRANGE (grows if a wider d_m is seen)

    if TYPE_CHECKING:  # provided by RedisMemoryStore

        def _guard(self, op: str) -> Any: ...
        def doc_key(self, doc_id: str) -> str: ...
        def mem_key(self, doc_id: str) -> str: ...

    # -- scans (index rebuild) ---------------------------------------------------------------------
    def iter_ids(self, batch_size: int = 1000) -> Iterator[list[str]]:
        """All stored ids in batches (ZSCAN: every id present for the whole scan is returned)."""
        cursor = 0
        while True:
            with self._guard("scan"):
                cursor, rows = self._r.zscan(self.ids_key, cursor, count=batch_size)
            if rows:
                yield [r[0].decode() for r in rows]
            if cursor == 0:
                return

    def iter_index_entries(self, batch_size: int = 1000) -> Iterator[list[IndexEntry]]:
        for ids in self.iter_ids(batch_size):
            got = self.fetch_index_entries(ids)
            yield [e for e in got.values() if e is not None]

    # -- index support -------------------------------------------------------------------------
    def fetch_index_entries(self, ids: Sequence[str]) -> dict[str, IndexEntry | None]:
        """Current index entry of each id (None if not stored), one pipeline round trip.

        Reads only the value's prefix (GETRANGE: header + version + key), not the k×d_m memory.
        """
        out: dict[str, IndexEntry | None] = {}
        if not ids:
            return out
        guess = self._prefix_guess
        with self._guard("fetch_index_entries"):
            pipe = self._r.pipeline(transaction=False)
            for i in ids:
                pipe.hmget(self.doc_key(i), _META_FIELDS)
                pipe.getrange(self.mem_key(i), 0, guess - 1)
            res = pipe.execute()
            refetch: list[int] = []
            for n, doc_id in enumerate(ids):
                meta, prefix = res[2 * n], res[2 * n + 1]
                if meta[0] is None or not prefix:
                    out[doc_id] = None
                    continue
                need = codec.prefix_length(prefix)
                if need > len(prefix):
                    refetch.append(n)
                    continue
                out[doc_id] = self._entry(doc_id, meta, prefix)
            if refetch:  # a wider d_m than guessed: read those again, and guess wider next time
                pipe = self._r.pipeline(transaction=False)
                for n in refetch:
                    pipe.hmget(self.doc_key(ids[n]), _META_FIELDS)
                    pipe.get(self.mem_key(ids[n]))
                res2 = pipe.execute()
                for j, n in enumerate(refetch):
                    meta, value = res2[2 * j], res2[2 * j + 1]
                    if meta[0] is None or value is None:
                        out[ids[n]] = None
                        continue
                    self._prefix_guess = max(self._prefix_guess, codec.prefix_length(value))
                    out[ids[n]] = self._entry(ids[n], meta, value)
        return out

    @staticmethod
    def _entry(doc_id: str, meta: list[bytes | None], prefix: bytes) -> IndexEntry:
        p = codec.decode_prefix(prefix)
        _, source, pub, received = meta
        return IndexEntry(
            id=doc_id,
            key=p.key,  # (d_k,)
            compressor_version=p.compressor_version,
            source=decode_optional(source),
            published_at=None if pub is None else from_us(int(pub)),
            received_at=from_us(int(received)) if received is not None else from_us(0),
        )

    # -- event stream ----------------------------------------------------------------------------
    def stream_last_id(self) -> str:
        """Id of the newest event ("0-0" if none). Read it *before* a scan so nothing is missed."""
        with self._guard("stream_last_id"):
            rows = self._r.xrevrange(self.events_key, count=1)
        return rows[0][0].decode() if rows else "0-0"

    def stream_position(self) -> StreamPosition | None:
        """XINFO STREAM of the event stream: newest id, entries ever added, length (None if no stream yet)."""
        from redis.exceptions import ResponseError

        try:
            info = self._r.xinfo_stream(self.events_key)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            with self._guard("stream_info"):
                raise
        except Exception:
            with self._guard("stream_info"):
                raise
        return StreamPosition(info["last-generated-id"].decode(), int(info["entries-added"]), int(info["length"]))

    def stream_first_id(self) -> str | None:
        """Id of the oldest event still in the stream (None if empty): detects a trimmed gap."""
        with self._guard("stream_first_id"):
            rows = self._r.xrange(self.events_key, count=1)
        return rows[0][0].decode() if rows else None

    def read_events(self, after_id: str, *, count: int = 1000, block_ms: int | None = None) -> list[StreamEvent]:
        """Events newer than `after_id` (XREAD; blocks up to `block_ms` if given and none yet)."""
        with self._guard("read_events"):
            res = self._r.xread({self.events_key: after_id}, count=count, block=block_ms)
        events: list[StreamEvent] = []
        for _, entries in res or []:
            for entry_id, fields in entries:
                events.append(StreamEvent(entry_id.decode(), fields[b"op"].decode(), fields[b"id"].decode()))
        return events

    # -- statistics ------------------------------------------------------------------------------
    def version_counts(self) -> dict[str, int]:
        """Number of documents per compressor version (maintained by the write scripts)."""
        with self._guard("version_counts"):
            raw = self._r.hgetall(self.cv_key)
        return {k.decode(): int(v) for k, v in raw.items() if int(v) > 0}

    def stale_count(self, compressor_version: str) -> int:
        """How many documents have a memory made by another compressor version."""
        counts = self.version_counts()
        return sum(v for k, v in counts.items() if k != compressor_version)

    def bank_stats(self, memory_size: Callable[[str], int], sample: int = 256) -> BankStats:
        """Bank size from Redis in two round trips, whatever the bank's size (no SCAN).

        Documents: ZCARD of the id set. Memories per compressor version: the counts the write
        scripts maintain. Memory bytes: those counts × `memory_size(version)`, the size of one
        stored value of that version (every memory of one compressor has the same size). Text
        bytes: exact (HSTRLEN of every text) up to `sample` documents, beyond that the mean of
        `sample` random documents (ZRANDMEMBER) × documents.
        """
        r = self._r
        with self._guard("bank_stats"):
            pipe = r.pipeline(transaction=False)
            pipe.zcard(self.ids_key)
            pipe.hgetall(self.cv_key)
            n, raw = pipe.execute()
            n = int(n)
            versions = {k.decode(): int(v) for k, v in raw.items() if int(v) > 0}
            ids = r.zrange(self.ids_key, 0, -1) if n <= sample else r.zrandmember(self.ids_key, sample)
            lengths: list[int] = []
            if ids:
                pipe = r.pipeline(transaction=False)
                for i in ids:
                    pipe.hstrlen(self.doc_key(i.decode()), "text")
                lengths = [int(x) for x in pipe.execute()]
        text = sum(lengths) if n <= sample else round(sum(lengths) / max(len(lengths), 1) * n)
        mem = sum(c * memory_size(cv) for cv, c in versions.items())
        return BankStats(n, versions, mem, text, len(lengths))

    # -- admin -------------------------------------------------------------------------------------
    def memory_usage(self, doc_id: str) -> tuple[int, int]:
        """(MEMORY USAGE of the doc hash, of the memory value), bytes as Redis accounts them."""
        with self._guard("memory_usage"):
            return (int(self._r.memory_usage(self.doc_key(doc_id), samples=0) or 0),
                    int(self._r.memory_usage(self.mem_key(doc_id), samples=0) or 0))

    def drop_bank(self) -> int:
        """Delete every key of this bank (tests, benchmarks). Returns the number of keys removed."""
        removed = 0
        with self._guard("drop_bank"):
            for ids in self.iter_ids(1000):
                keys = [self.doc_key(i) for i in ids] + [self.mem_key(i) for i in ids]
                removed += int(self._r.delete(*keys))
            removed += int(self._r.delete(self.ids_key, self.events_key, self.cv_key))
        return removed

