"""Keeping a `VectorIndex` equal to what a Redis bank holds, across replicas.

Start-up: read the event stream's position *first*, then scan the bank (ZSCAN + pipelined prefix
reads), then follow the stream from that position: an event racing with the scan is applied
after it, never lost. Writes through this process's store reach the index at once (store
listener); other replicas' writes arrive through the stream (XREAD BLOCK in a daemon thread, or
`sync()` called by hand).

Applying an event does not trust its content: it re-reads the *current* state of the named ids
(one pipeline) and upserts or removes accordingly. That makes application idempotent and
order-insensitive, so the index converges to Redis even when a local write and a remote event
interleave. If the stream was trimmed past our position (we fell more than MAXLEN events
behind: detected from XINFO's entries-added counter), the index is rebuilt from a scan.

With `snapshots` (`index_restore.IndexSnapshots`), start-up first tries the bank's snapshot file
(the index's arrays and the stream position they reflect) and replays only the events after it;
a missing, corrupt, foreign or stale one falls back to the rebuild, after which (as after any
full rebuild) a fresh snapshot is written in the background, as it is periodically and on close.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Self

import numpy as np
import torch

from service.errors import StorageUnavailableError
from service.storage.base import IndexEntry, MemoryStore, SearchFilters, StreamEvent
from service.storage.index import SearchHit, VectorIndex
from service.storage.index_state import IndexState, StateColumns

if TYPE_CHECKING:
    from service.storage.index_restore import IndexSnapshots
    from service.storage.index_snapshot import StreamMark

log = logging.getLogger(__name__)


class SyncedIndex:
    """A `VectorIndex` fed from a `MemoryStore`: rebuilt at start, then following the stream.

    >>> with SyncedIndex(store).start() as idx:         # doctest: +SKIP
    ...     hits = idx.search(q, 8, compressor_version="v3")
    """

    def __init__(
        self,
        store: MemoryStore,
        index: VectorIndex | None = None,
        *,
        block_ms: int = 200,
        batch_size: int = 1000,
        gap_check_s: float = 1.0,
        snapshots: IndexSnapshots | None = None,
    ) -> None:
        self.store = store
        self.index = index if index is not None else VectorIndex()  # an empty index is falsy (len 0)
        self.block_ms = block_ms
        self.batch_size = batch_size
        self.gap_check_s = gap_check_s
        self.snapshots = snapshots
        self.last_id = "0-0"
        self._seq = 0  # stream entries consumed up to last_id (XINFO entries-added numbering)
        self._lock = threading.RLock()  # one reader of the stream at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_gap_check = 0.0
        self.rebuilds = 0
        self.last_error: StorageUnavailableError | None = None

    # -- start-up -----------------------------------------------------------------------------
    def start(self, *, follow: bool = True) -> SyncedIndex:
        """Restore the snapshot or rebuild from Redis, hook local writes, and (if `follow`) start
        the follower thread."""
        self.store.add_listener(self._on_local_write)
        if self.snapshots is None or not self.snapshots.restore(self):
            self.rebuild()
        if self.snapshots is not None:
            self.snapshots.start(self)
        if follow:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"cmt-index-sync-{self.store.bank}", daemon=True)
            self._thread.start()
        return self

    def _stream_position(self) -> tuple[str, int]:
        pos = self.store.stream_position()
        return ("0-0", 0) if pos is None else (pos.last_id, pos.entries_added)

    def rebuild(self) -> int:
        """Reload every entry from Redis (position read before the scan). Returns the count.

        Searches keep using the old entries until the new ones are swapped in; local writes made
        during the scan are replayed onto them (`VectorIndex.rebuild`), remote ones arrive as
        stream events after the position read first.
        """
        with self._lock:
            last_id, seq = self._stream_position()
            n = self.index.rebuild(self.store.iter_index_entries(self.batch_size))
            self.last_id, self._seq = last_id, seq
            self.rebuilds += 1
        if self.snapshots is not None:  # a full rebuild is worth keeping
            self.snapshots.request()
        return n

    # -- snapshots ------------------------------------------------------------------------------
    def install(self, load: Callable[[], tuple[IndexState, StreamMark]]) -> None:
        """Replace the index with a loaded state reflecting the stream up to its mark; local writes
        made while `load` runs are replayed onto it (`VectorIndex.replace`). If `load` raises,
        nothing changes."""
        with self._lock:
            marks: list[StreamMark] = []

            def build() -> IndexState:
                state, mark = load()
                marks.append(mark)
                return state

            self.index.replace(build)
            self.last_id, self._seq = marks[0].last_id, marks[0].seq

    def catch_up(self) -> int:
        """Apply every stream event there is now (a restored index replaying). Returns how many."""
        total = 0
        while (got := self.sync()) > 0:
            total += got
        return total

    def change_key(self) -> tuple[int, str]:
        """Changes to the index and stream position: equal keys mean an unchanged snapshot."""
        with self._lock:
            return self.index.changes, self.last_id

    def capture(self) -> tuple[StateColumns | None, str, int, tuple[int, str]]:
        """The index as arrays with the stream position they reflect (no event applied meanwhile)."""
        with self._lock:
            cols, changes = self.index.capture()
            return cols, self.last_id, self._seq, (changes, self.last_id)

    # -- following --------------------------------------------------------------------------------
    def _on_local_write(self, puts: list[IndexEntry], deletes: list[str]) -> None:
        self.index.upsert(puts)
        self.index.remove(deletes)

    def sync(self, *, block_ms: int | None = None) -> int:
        """Apply new stream events (non-blocking unless `block_ms`). Returns how many were read."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_gap_check >= self.gap_check_s:
                self._last_gap_check = now
                if self._gap():
                    log.warning("index fell behind the trimmed event stream of bank %s: rebuilding", self.store.bank)
                    self.rebuild()
                    return 0
            events = self.store.read_events(self.last_id, count=self.batch_size, block_ms=block_ms)
            if events:
                self._apply(events)
            return len(events)

    def _gap(self) -> bool:
        pos = self.store.stream_position()
        return pos is not None and pos.entries_added - pos.length > self._seq

    def _apply(self, events: list[StreamEvent]) -> None:
        ids = list(dict.fromkeys(e.doc_id for e in events))
        current = self.store.fetch_index_entries(ids)
        self.index.upsert([e for e in current.values() if e is not None])
        self.index.remove([i for i, e in current.items() if e is None])
        self.last_id = events[-1].entry_id
        self._seq += len(events)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                self.sync(block_ms=self.block_ms)
                self.last_error = None
                backoff = 0.05
            except StorageUnavailableError as exc:  # Redis down: keep serving the index, retry
                if self.last_error is None:
                    log.warning("index follower: %s", exc.message)
                self.last_error = exc
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:  # never let the follower die silently
                log.exception("index follower failed; retrying")
                self._stop.wait(1.0)

    # -- queries (delegated) -----------------------------------------------------------------------
    def search(
        self,
        query: np.ndarray | torch.Tensor,  # (d,)
        k: int,
        filters: SearchFilters | None = None,
        *,
        compressor_version: str | None = None,
        approximate: bool | None = None,
    ) -> list[SearchHit]:
        return self.index.search(query, k, filters, compressor_version=compressor_version, approximate=approximate)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def is_approximate(self) -> bool:
        return self.index.is_approximate

    def stale_count(self, compressor_version: str) -> int:
        return self.index.stale_count(compressor_version)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 + self.block_ms / 1000)
            self._thread = None
        if self.snapshots is not None:  # clean shutdown: the next start replays from here
            self.snapshots.close(self)
        self.store.remove_listener(self._on_local_write)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
