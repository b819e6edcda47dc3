"""The arrays behind `VectorIndex` (not thread-safe on its own: the index holds the lock).

Column arrays, one row per written entry, rows append-only (a row's key never changes once
written, so a snapshot can read `keys[:n]` without copying while writers append):
keys (cap, d) float32 L2-normalised, alive (cap,) bool, pub/recv (cap,) int64 µs since epoch
(NO_TIME when unknown), src/cv (cap,) int32 codes into small string tables (-1 = no source).
`export`/`write_graph`/`from_columns` turn a state into plain arrays and back (the on-disk snapshot,
`index_snapshot.py`); the HNSW graph travels without its vectors, which are `keys` again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

import faiss
import numpy as np

from service.storage.base import IndexEntry, from_us, to_us

NO_TIME = np.iinfo(np.int64).min


@dataclass(frozen=True)
class StateColumns:
    """An `IndexState` as plain arrays, tombstoned rows included (HNSW row ids are row numbers).

    Rows [0, n) are used; the arrays may be longer (spare capacity for later appends). From
    `export` they are views of the live state (safe to read off the lock: rows below n never
    change) except `alive`, which is a copy.
    """

    d: int
    n: int
    keys: np.ndarray  # (>=n, d) float32, L2-normalised
    alive: np.ndarray  # (>=n,) bool
    pub: np.ndarray  # (>=n,) int64
    recv: np.ndarray  # (>=n,) int64
    src: np.ndarray  # (>=n,) int32
    cv: np.ndarray  # (>=n,) int32
    ids: list[str]  # (n,)
    src_names: list[str]
    cv_names: list[str]
    graph: np.ndarray | None  # HNSW graph without vectors (faiss IO_FLAG_SKIP_STORAGE), uint8; None = exact


def graph_writer(size_hint: int) -> faiss.VectorIOWriter:
    """An empty buffer for `IndexState.write_graph` whose first `size_hint` bytes are already backed
    by memory: made off the index lock, it turns the write under the lock into a memcpy instead of
    page faults (7 ms instead of 174 ms for a 27 MB graph of 10^5 rows)."""
    writer = faiss.VectorIOWriter()
    if size_hint > 0:
        writer.data.resize(size_hint)  # zero-filled: every page touched now
        writer.data.resize(0)  # the capacity (and its pages) stays
    return writer


def graph_from_bytes(data: np.ndarray, keys: np.ndarray) -> faiss.IndexHNSWFlat:
    """Inverse of `graph_bytes`, the vectors given back as `keys` (n, d): no graph construction."""
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.ascontiguousarray(data, np.uint8), reader.data)
    index = faiss.read_index(reader)
    if not isinstance(index, faiss.IndexHNSWFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"graph is a {type(index).__name__}, not an inner-product IndexHNSWFlat")
    if index.d != keys.shape[1] or index.ntotal != keys.shape[0]:
        raise ValueError(f"graph of {index.ntotal} x {index.d} for {keys.shape[0]} keys of dimension {keys.shape[1]}")
    storage = faiss.IndexFlatIP(index.d)
    storage.add(keys)  # (n, d)
    index.storage = storage
    index.own_fields = True
    storage.this.disown()  # the HNSW index frees it
    return index


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float  # cosine similarity of query and retrieval key
    compressor_version: str
    source: str | None
    published_at: datetime | None
    received_at: datetime


def _fit(key: np.ndarray, d: int) -> np.ndarray:
    """`key` (d,) as is; a key of another width → zeros (d,) (see IndexState.upsert)."""
    return key if key.shape[0] == d else np.zeros(d, np.float32)


class IndexState:
    def __init__(self, d: int | None = None, capacity: int = 1024) -> None:
        self.d = d
        self.n = 0  # rows used (live + tombstoned)
        self.n_alive = 0
        self.cap = 0
        self.row_of: dict[str, int] = {}
        self.ids: list[str] = []
        self.src_code: dict[str, int] = {}
        self.src_name: list[str] = []
        self.cv_code: dict[str, int] = {}
        self.cv_name: list[str] = []
        self.cv_counts: Counter[str] = Counter()
        self.hnsw: faiss.IndexHNSWFlat | None = None
        if d is not None:
            self._alloc(d, capacity)

    def _alloc(self, d: int, capacity: int) -> None:
        self.d, self.cap = d, capacity
        self.keys = np.zeros((capacity, d), np.float32)  # (cap, d)
        self.alive = np.zeros(capacity, bool)  # (cap,)
        self.pub = np.full(capacity, NO_TIME, np.int64)  # (cap,)
        self.recv = np.zeros(capacity, np.int64)  # (cap,)
        self.src = np.full(capacity, -1, np.int32)  # (cap,)
        self.cv = np.zeros(capacity, np.int32)  # (cap,)

    def _grow(self, need: int) -> None:
        new_cap = max(need, 2 * self.cap, 1024)
        for name in ("keys", "alive", "pub", "recv", "src", "cv"):
            old = getattr(self, name)
            new = np.empty((new_cap, *old.shape[1:]), old.dtype)  # (new_cap, ...)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)
        self.cap = new_cap

    def _code(self, table: dict[str, int], names: list[str], value: str) -> int:
        code = table.get(value)
        if code is None:
            code = table[value] = len(names)
            names.append(value)
        return code

    # -- writes ------------------------------------------------------------------------------
    def upsert(self, entries: list[IndexEntry]) -> None:
        if self.d is None:
            self._alloc(int(entries[0].key.shape[0]), max(1024, len(entries)))
        # A key of another width is a memory made by another checkpoint (a bank older than the serving model):
        # it is held with a zero key, so it still counts as stale (cmt-reindex) and can be deleted, but a
        # search, which takes one compressor version, never finds it.
        keys = np.stack([_fit(np.asarray(e.key, np.float32).reshape(-1), self.d) for e in entries])  # (B, d)
        norms = np.linalg.norm(keys, axis=1, keepdims=True)  # (B, 1)
        keys /= np.where(norms == 0, 1, norms)
        self.remove([e.id for e in entries])
        # a batch can name one id twice: only its last entry lives
        last = {e.id: i for i, e in enumerate(entries)}
        take = sorted(last.values())
        b = len(take)
        if self.n + b > self.cap:
            self._grow(self.n + b)
        rows = slice(self.n, self.n + b)
        self.keys[rows] = keys[take]  # (b, d)
        self.alive[rows] = True
        for j, i in enumerate(take):
            e, r = entries[i], self.n + j
            self.pub[r] = NO_TIME if e.published_at is None else to_us(e.published_at)
            self.recv[r] = to_us(e.received_at)
            self.src[r] = -1 if e.source is None else self._code(self.src_code, self.src_name, e.source)
            self.cv[r] = self._code(self.cv_code, self.cv_name, e.compressor_version)
            self.row_of[e.id] = r
            self.ids.append(e.id)
            self.cv_counts[e.compressor_version] += 1
        if self.hnsw is not None:
            self.hnsw.add(self.keys[rows])  # faiss row ids stay equal to our row numbers
        self.n += b
        self.n_alive += b

    def remove(self, ids: list[str]) -> None:
        for doc_id in ids:
            r = self.row_of.pop(doc_id, None)
            if r is None:
                continue
            self.alive[r] = False
            self.n_alive -= 1
            self.cv_counts[self.cv_name[self.cv[r]]] -= 1

    def snapshot_alive(self) -> IndexState:
        """A compact copy holding only live rows (no HNSW yet)."""
        new = IndexState(self.d)
        if self.d is None or self.n_alive == 0:
            return new
        rows = np.flatnonzero(self.alive[: self.n])  # (n_alive,)
        new._alloc(self.d, max(1024, int(len(rows) * 1.25)))
        m = len(rows)
        for name in ("keys", "alive", "pub", "recv", "src", "cv"):
            getattr(new, name)[:m] = getattr(self, name)[rows]
        new.n = new.n_alive = m
        new.ids = [self.ids[r] for r in rows]
        new.row_of = {doc_id: i for i, doc_id in enumerate(new.ids)}
        new.src_code, new.src_name = dict(self.src_code), list(self.src_name)
        new.cv_code, new.cv_name = dict(self.cv_code), list(self.cv_name)
        new.cv_counts = Counter({k: v for k, v in self.cv_counts.items() if v > 0})
        return new

    def export(self) -> StateColumns | None:
        """This state as arrays, the graph left out (`write_graph`); None when empty. Cheap: the
        holder of the lock calls it (copies alive flags and the id list; the rest are views)."""
        if self.d is None or self.n == 0:
            return None
        n = self.n
        return StateColumns(
            d=self.d, n=n, keys=self.keys[:n], alive=self.alive[:n].copy(), pub=self.pub[:n], recv=self.recv[:n],
            src=self.src[:n], cv=self.cv[:n], ids=self.ids[:n], src_names=list(self.src_name),
            cv_names=list(self.cv_name), graph=None,
        )

    def graph_size_hint(self) -> int:
        """About the bytes `write_graph` writes (links, offsets, levels); 0 without a graph."""
        if self.hnsw is None:
            return 0
        h = self.hnsw.hnsw
        return 4 * h.neighbors.size() + 8 * h.offsets.size() + 4 * h.levels.size() + 4096

    def write_graph(self, writer: faiss.VectorIOWriter) -> bool:
        """Append the HNSW graph without its vectors (they are `keys`) to `writer`; False if none.
        The one part of a snapshot copied in full under the lock: writers change links in place."""
        if self.hnsw is None:
            return False
        faiss.write_index(self.hnsw, writer, faiss.IO_FLAG_SKIP_STORAGE)
        return True

    @classmethod
    def from_columns(cls, c: StateColumns) -> IndexState:
        """A state backed by `c`'s arrays (no copy); raises ValueError if they do not fit together."""
        cap = c.keys.shape[0]
        if not (c.n <= cap and c.keys.shape[1] == c.d and len(c.ids) == c.n
                and all(a.shape == (cap,) for a in (c.alive, c.pub, c.recv, c.src, c.cv))):
            raise ValueError("snapshot columns disagree in length or dimension")
        n = c.n
        src, cv = c.src[:n], c.cv[:n]
        if n and (src.min() < -1 or src.max() >= len(c.src_names) or cv.min() < 0 or cv.max() >= len(c.cv_names)):
            raise ValueError("snapshot columns hold codes outside their string tables")
        st = cls()
        st.d, st.cap, st.n = c.d, cap, n
        st.keys, st.alive, st.pub, st.recv, st.src, st.cv = c.keys, c.alive, c.pub, c.recv, c.src, c.cv
        st.alive[n:] = False
        st.ids = list(c.ids)
        live = np.flatnonzero(st.alive[:n])  # (n_alive,)
        st.row_of = {st.ids[r]: r for r in live.tolist()}
        if len(st.row_of) != len(live):
            raise ValueError("snapshot has one id alive in two rows")
        st.n_alive = len(live)
        st.src_name, st.cv_name = list(c.src_names), list(c.cv_names)
        st.src_code = {s: i for i, s in enumerate(st.src_name)}
        st.cv_code = {s: i for i, s in enumerate(st.cv_name)}
        counts = np.bincount(cv[live], minlength=len(st.cv_name))  # (versions,)
        st.cv_counts = Counter({name: int(k) for name, k in zip(st.cv_name, counts, strict=True) if k})
        if c.graph is not None:
            st.hnsw = graph_from_bytes(c.graph, st.keys[:n])
        return st

    def build_hnsw(self, m: int, ef_construction: int) -> None:
        assert self.d is not None
        index = faiss.IndexHNSWFlat(self.d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(self.keys[: self.n])  # (n, d)
        self.hnsw = index

    # -- search --------------------------------------------------------------------------------
    def mask(
        self, cv: str | None, source: str | Collection[str] | None, pub_from: int | None, pub_to: int | None
    ) -> np.ndarray | None:
        """Rows to consider, (n,) bool; None means every live row (no filter, fast path)."""
        n = self.n
        mask: np.ndarray | None = None
        if cv is not None and self.cv_counts.get(cv, 0) != self.n_alive:
            code = self.cv_code.get(cv, -2)
            mask = self.cv[:n] == code
        if source is not None:
            names = [source] if isinstance(source, str) else list(source)
            codes = [self.src_code[s] for s in names if s in self.src_code]
            m = np.isin(self.src[:n], np.asarray(codes, np.int32))
            mask = m if mask is None else mask & m
        if pub_from is not None or pub_to is not None:
            p = self.pub[:n]
            m = p != NO_TIME
            if pub_from is not None:
                m &= p >= pub_from
            if pub_to is not None:
                m &= p < pub_to
            mask = m if mask is None else mask & m
        if mask is None:
            return None if self.n_alive == n else self.alive[:n].copy()
        return mask & self.alive[:n]

    def search_exact(self, q: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = self.n
        if mask is None:
            scores = self.keys[:n] @ q  # (n,)
            cand = None
        elif np.count_nonzero(mask) * 2 < n:
            cand = np.flatnonzero(mask)  # (m,)
            scores = self.keys[cand] @ q  # (m,)
        else:
            scores = self.keys[:n] @ q  # (n,)
            scores[~mask] = -np.inf
            cand = None
        k = min(k, scores.shape[0])
        top = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
        top = top[np.argsort(-scores[top], kind="stable")]  # (k,)
        rows = top if cand is None else cand[top]
        return rows, scores[top]

    def search_hnsw(
        self, q: np.ndarray, k: int, mask: np.ndarray | None, ef: int
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self.hnsw is not None
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef
        bits = None
        if mask is not None:
            bits = np.packbits(mask, bitorder="little")  # (ceil(n/8),) uint8; must outlive the search
            sel = faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(bits))
            params.sel = sel
        scores, rows = self.hnsw.search(q[None, :], k, params=params)  # (1, k), (1, k)
        keep = rows[0] >= 0
        del bits
        return rows[0][keep], scores[0][keep]

    def hit(self, row: int, score: float) -> SearchHit:
        pub = int(self.pub[row])
        src = int(self.src[row])
        return SearchHit(
            id=self.ids[row],
            score=score,
            compressor_version=self.cv_name[int(self.cv[row])],
            source=None if src < 0 else self.src_name[src],
            published_at=None if pub == NO_TIME else from_us(pub),
            received_at=from_us(int(self.recv[row])),
        )
