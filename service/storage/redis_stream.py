"""The bank's event stream (followed by other replicas' indexes) and admin helpers.

A mixin of `RedisMemoryStore`, split out to keep modules small; it uses the store's client
(`_r`), key names and error guard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


@dataclass(frozen=True)
class StreamEvent:
    entry_id: str
    op: str  # "put" | "delete"
    doc_id: str


class StreamAndAdminMixin:
    _r: Any
    events_key: str
    ids_key: str
    cv_key: str

    if TYPE_CHECKING:  # provided by RedisMemoryStore

        def _guard(self, op: str) -> Any: ...
        def doc_key(self, doc_id: str) -> str: ...
        def mem_key(self, doc_id: str) -> str: ...
        def iter_ids(self, batch_size: int = 1000) -> Any: ...

    # -- event stream ----------------------------------------------------------------------------
    def stream_last_id(self) -> str:
        """Id of the newest event ("0-0" if none). Read it *before* a scan so nothing is missed."""
        with self._guard("stream_last_id"):
            rows = self._r.xrevrange(self.events_key, count=1)
        return rows[0][0].decode() if rows else "0-0"

    def stream_info(self) -> dict[str, Any] | None:
        """XINFO STREAM of the event stream (None if it does not exist yet)."""
        from redis.exceptions import ResponseError

        try:
            return dict(self._r.xinfo_stream(self.events_key))
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            with self._guard("stream_info"):
                raise
        except Exception:
            with self._guard("stream_info"):
                raise

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

