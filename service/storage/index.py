"""In-process top-k over retrieval keys: exact by default, FAISS HNSW above a configurable size.

Scores are inner products of L2-normalised keys (cosine). Rows are append-only: an update or a
delete tombstones the old row (`alive=False`) and an update appends a new one, because
IndexHNSW cannot remove or overwrite vectors. Tombstoned and filtered-out rows are excluded
*inside* the HNSW search with an `IDSelectorBitmap`, so a filtered search still returns the top-k
among matching documents. When the filter keeps few rows (< `exact_fraction` of the live ones)
graph search would wander through non-matching nodes, so the matching rows are scored exactly
instead (cheap precisely because they are few). Once tombstones exceed `compact_fraction`, a
maintenance job rebuilds a compact state (and its HNSW) off the lock from a snapshot, replays the
writes made meanwhile, then swaps it in: searches never wait for a rebuild. `rebuild(batches)`
replaces every entry the same way (an index rebuilt from the store by `SyncedIndex`), and so does
`replace(build)` with a state made elsewhere (one loaded from a snapshot). `capture()` hands out the
state as arrays for a snapshot, holding the lock only to copy what writers change in place.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import faiss
import numpy as np
import torch

from service.errors import InvalidInputError
from service.storage.base import IndexEntry, SearchFilters, to_us
from service.storage.index_state import IndexState, SearchHit, StateColumns, graph_writer

log = logging.getLogger(__name__)


_NO_FILTERS = SearchFilters()


class VectorIndex:
    """Thread-safe top-k index with tombstones, filters and an optional HNSW graph."""

    def __init__(
        self,
        *,
        approx_threshold: int = 50_000,
        hnsw_m: int = 32,
        ef_construction: int = 64,
        ef_search: int = 128,
        exact_fraction: float = 0.05,
        compact_fraction: float = 0.25,
        compact_min_dead: int = 1_000,
        auto_maintain: bool = True,
        dim: int | None = None,
    ) -> None:
        self._dim = dim
        """The key width of the serving checkpoint (None: that of the first key upserted). Keys of another width
        (memories of another checkpoint) are held as stale rows that no search finds (IndexState.upsert)."""
        self.approx_threshold = approx_threshold
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.exact_fraction = exact_fraction
        self.compact_fraction = compact_fraction
        self.compact_min_dead = compact_min_dead
        self.auto_maintain = auto_maintain
        self._lock = threading.RLock()
        self._state = IndexState(self._dim)
        # Writes made while a new state is built off the lock (maintenance job or rebuild), replayed
        # onto it before it is swapped in; None when nothing is being built.
        self._oplog: list[tuple[str, list[IndexEntry] | list[str]]] | None = None
        self._job: threading.Thread | None = None
        self._rebuild_lock = threading.Lock()  # one rebuild() at a time
        self.changes = 0
        """Counts writes and swaps: a snapshot writer compares it to skip an unchanged index."""
        self.capture_lock_s = 0.0
        """Seconds the last `capture` held the lock (what a snapshot costs searches and writers)."""

    # -- writes ------------------------------------------------------------------------------
    def upsert(self, entries: Sequence[IndexEntry]) -> None:
        if not entries:
            return
        with self._lock:
            self._state.upsert(list(entries))
            self.changes += 1
            if self._oplog is not None:
                self._oplog.append(("upsert", list(entries)))
        self._maybe_maintain()

    def remove(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        with self._lock:
            self._state.remove(list(ids))
            self.changes += 1
            if self._oplog is not None:
                self._oplog.append(("remove", list(ids)))
        self._maybe_maintain()

    def clear(self) -> None:
        with self._lock:
            self._state = IndexState(self._dim)
            self.changes += 1
            if self._oplog is not None:
                self._oplog.append(("clear", []))

    # -- queries -----------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:  # an upsert removes then re-adds: never show the count in between
            return self._state.n_alive

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._state.row_of

    @property
    def dim(self) -> int | None:
        return self._state.d

    @property
    def is_approximate(self) -> bool:
        return self._state.hnsw is not None

    def version_counts(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self._state.cv_counts.items() if v > 0}

    def stale_count(self, compressor_version: str) -> int:
        """Live documents whose memory was made by another compressor version."""
        return sum(v for k, v in self.version_counts().items() if k != compressor_version)

    def key_of(self, doc_id: str) -> np.ndarray | None:
        """The stored (L2-normalised) key of a live document, a copy: (d,) float32."""
        with self._lock:
            row = self._state.row_of.get(doc_id)
            return None if row is None else self._state.keys[row].copy()

    def capture(self) -> tuple[StateColumns | None, int]:
        """The current entries as arrays, and `changes` at that moment (None: empty index).

        Under the lock only: a copy of the alive flags and id list, and the HNSW graph's links
        (writers change those in place) into a buffer whose memory was touched before taking the
        lock; keys and metadata are views, since rows are append-only.
        """
        with self._lock:
            hint = self._state.graph_size_hint()
        writer = graph_writer(hint + hint // 16)  # room for rows added meanwhile
        with self._lock:
            t0 = time.perf_counter()
            cols, changes = self._state.export(), self.changes
            has_graph = self._state.write_graph(writer)
            self.capture_lock_s = time.perf_counter() - t0
        if cols is not None and has_graph:
            cols = dataclasses.replace(cols, graph=faiss.vector_to_array(writer.data))
        return cols, changes

    def entry(self, doc_id: str) -> SearchHit | None:
        with self._lock:
            row = self._state.row_of.get(doc_id)
            return None if row is None else self._state.hit(row, float("nan"))

    def search(
        self,
        query: np.ndarray | torch.Tensor,  # (d,)
        k: int,
        filters: SearchFilters | None = None,
        *,
        compressor_version: str | None = None,
        approximate: bool | None = None,
    ) -> list[SearchHit]:
        """Top-k documents by cosine similarity, best first, among those matching every filter.

        `filters`: see `SearchFilters` (None = every document).
        `compressor_version`: only memories made by that compressor (never mix versions).
        `approximate`: None = automatic (HNSW when built), False = force exact.
        """
        f = _NO_FILTERS if filters is None else filters
        if k <= 0:
            return []
        q = self._query(query)  # (d,)
        pf, pt = f.published_from, f.published_to
        with self._lock:
            st = self._state
            if st.n_alive == 0:
                return []
            if q.shape[0] != st.d:
                raise InvalidInputError(f"query has dimension {q.shape[0]}; the index holds keys of dimension {st.d}")
            mask = st.mask(compressor_version, f.source, None if pf is None else to_us(pf),
                           None if pt is None else to_us(pt))  # (n,) bool or None (= every live row)
            m = st.n_alive if mask is None else int(np.count_nonzero(mask))
            if m == 0:
                return []
            kk = min(k, m)
            use_ann = (st.hnsw is not None and approximate is not False
                       and m >= self.exact_fraction * st.n_alive)
            rows = scores = None
            if use_ann:
                rows, scores = st.search_hnsw(q, kk, mask, max(self.ef_search, kk))
                if len(rows) < kk:  # the graph could not reach enough matches: exact answer instead
                    rows = scores = None
            if rows is None:
                rows, scores = st.search_exact(q, kk, mask)
            return [st.hit(int(r), float(s)) for r, s in zip(rows, scores, strict=True)]

    def _query(self, query: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(query, torch.Tensor):
            query = query.detach().to("cpu", torch.float32).numpy()
        q = np.asarray(query, dtype=np.float32).reshape(-1)  # (d,)
        if not np.all(np.isfinite(q)):
            raise InvalidInputError("query key contains NaN or infinite values")
        norm = float(np.linalg.norm(q))
        if norm == 0.0:
            raise InvalidInputError("query key is the zero vector")
        return q / norm

    # -- maintenance: HNSW build and compaction, off the lock -----------------------------------
    def needs_maintenance(self) -> bool:
        st = self._state
        want_ann = st.n_alive >= self.approx_threshold and st.hnsw is None
        drop_ann = st.hnsw is not None and st.n_alive < self.approx_threshold // 2
        dead = st.n - st.n_alive
        compact = dead >= self.compact_min_dead and dead > self.compact_fraction * st.n
        return want_ann or drop_ann or compact

    def _maybe_maintain(self) -> None:
        if self.auto_maintain and self.needs_maintenance() and (self._job is None or not self._job.is_alive()):
            self.maintain(wait=False)

    def maintain(self, *, wait: bool = True) -> None:
        """Rebuild a compact state (with HNSW if large enough) and swap it in."""
        with self._lock:
            if self._job is not None and self._job.is_alive():
                job = self._job
            elif self._oplog is not None:  # a rebuild() is replacing every entry; it maintains when done
                return
            else:
                self._oplog = []
                snapshot = self._state.snapshot_alive()
                job = threading.Thread(
                    target=self._maintenance_job, args=(snapshot,), name="cmt-index-maintain", daemon=True
                )
                self._job = job
                job.start()
        if wait:
            job.join()

    def wait_for_maintenance(self) -> None:
        """Return once no maintenance job is running (one started earlier swaps its state in first)."""
        job = self._job
        if job is not None:
            job.join()

    def rebuild(self, batches: Iterable[Sequence[IndexEntry]]) -> int:
        """Replace every entry with those of `batches` (read from the store); returns how many were read.

        Built off the lock like a maintenance job: searches use the current entries until the new
        ones are swapped in, and writes made to this index meanwhile are replayed onto them first,
        so a write racing with the rebuild is never lost.
        """
        n = 0

        def build() -> IndexState:
            nonlocal n
            fresh = IndexState(self._dim)
            for entries in batches:
                if entries:
                    fresh.upsert(list(entries))
                    n += len(entries)
            return fresh

        self.replace(build)
        return n

    def replace(self, build: Callable[[], IndexState]) -> None:
        """Replace every entry with the state `build()` returns, built off the lock as in `rebuild`.

        If `build` raises, the current entries stay (writes made meanwhile included) and the
        exception propagates.
        """
        with self._rebuild_lock:
            while True:  # a running maintenance job would swap its older state in after ours
                with self._lock:
                    job = self._job if self._job is not None and self._job.is_alive() else None
                    if job is None:
                        self._oplog = []
                        break
                job.join()
            try:
                self._swap_in(build())
            finally:
                with self._lock:
                    self._oplog = None
        self._maybe_maintain()

    def _maintenance_job(self, snapshot: IndexState) -> None:
        try:
            self._swap_in(snapshot)
        except Exception:  # a failed rebuild must not take the serving state down
            log.exception("index maintenance failed; keeping the current state")
            with self._lock:
                self._oplog = None

    def _swap_in(self, fresh: IndexState) -> None:
        """Build HNSW on `fresh` if large enough (off the lock), replay the logged writes, swap it in."""
        if fresh.n_alive >= self.approx_threshold and fresh.hnsw is None:
            fresh.build_hnsw(self.hnsw_m, self.ef_construction)
        with self._lock:
            for op, arg in self._oplog or []:
                if op == "upsert":
                    fresh.upsert(arg)  # type: ignore[arg-type]
                elif op == "remove":
                    fresh.remove(arg)  # type: ignore[arg-type]
                else:
                    fresh = IndexState(self._dim)
            self._state = fresh
            self.changes += 1
            self._oplog = None


__all__ = ["SearchHit", "VectorIndex"]
