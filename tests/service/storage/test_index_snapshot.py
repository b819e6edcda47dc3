"""Index snapshots: a restart loads the index from its file and replays the events after it, and
falls back to the full rebuild from Redis whenever the file is corrupt, foreign or stale."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from service.storage.base import DocumentInput, SearchFilters
from service.storage.index import VectorIndex
from service.storage.index_restore import IndexSnapshots
from service.storage.index_snapshot import read_header, snapshot_path
from service.storage.redis_store import RedisMemoryStore
from service.storage.sync import SyncedIndex

from .helpers import clustered_keys, doc, memory_for, published

N_DOCS = 300


def wait_for(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(0.005)


@pytest.fixture
def stores(redis_url: str, store: RedisMemoryStore) -> Iterator[Callable[[], RedisMemoryStore]]:
    """Another connection to the test's bank per call: each index is its own process's store."""
    opened: list[RedisMemoryStore] = []

    def make() -> RedisMemoryStore:
        opened.append(RedisMemoryStore(redis_url, bank=store.bank, max_batch=2000))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


def start(store: RedisMemoryStore, folder: Path | None, **kw: object) -> SyncedIndex:
    """An index as a (re)starting replica opens it: from the snapshot in `folder` if usable."""
    snaps = None if folder is None else IndexSnapshots(folder, interval_s=0, **kw)  # type: ignore[arg-type]
    return SyncedIndex(store, VectorIndex(approx_threshold=100), snapshots=snaps).start(follow=False)


def fill(store: RedisMemoryStore) -> None:
    """N_DOCS documents with sources and dates."""
    store.put_many([(doc(i, source=f"s{i % 3}", published_at=published(i)), *memory_for(i))
                    for i in range(N_DOCS)], "v1")


def mutate(store: RedisMemoryStore) -> None:
    """Replace 10 documents (new keys, another compressor version) and delete 5: through an index's
    own store, its state then holds tombstoned rows."""
    store.put_many([(doc(i, f"edited {i}"), memory_for(i)[0], memory_for(10_000 + i)[1]) for i in range(0, 40, 4)],
                   "v2")
    store.delete_many([f"doc-{i}" for i in range(1, 30, 7)])


def snapshot_of_bank(store: RedisMemoryStore, folder: Path) -> Path:
    """Fill the bank, start an index on it, `mutate` through it, shut it down: its snapshot's path."""
    fill(store)
    a = start(store, folder)
    mutate(store)
    a.close()
    assert a.snapshots is not None
    return a.snapshots.path_for(store)


def results(idx: SyncedIndex, approximate: bool | None) -> list[list[tuple[str, float]]]:
    out = []
    for i in [*range(0, N_DOCS, 10), 10_004, 10_008]:
        for f in (None, SearchFilters(source=("s1",))):
            hits = idx.search(memory_for(i)[1], 8, f, approximate=approximate)
            out.append([(h.id, round(h.score, 5)) for h in hits])
    return out


def assert_same_as_rebuild(idx: SyncedIndex, store: RedisMemoryStore) -> None:
    fresh = start(store, None)
    try:
        assert len(idx) == len(fresh) == store.count()
        assert idx.index.version_counts() == fresh.index.version_counts() == store.version_counts()
        assert results(idx, False) == results(fresh, False)
    finally:
        fresh.close()


def test_round_trip_equals_the_rebuilt_index(tmp_path: Path, store: RedisMemoryStore, stores) -> None:
    fill(store)
    a = start(stores(), tmp_path)
    mutate(a.store)  # type: ignore[arg-type]
    assert a.rebuilds == 1 and a.is_approximate
    before_exact, before_ann = results(a, False), results(a, None)
    a.close()
    assert a.snapshots is not None
    path = a.snapshots.path_for(store)
    header = read_header(path)
    assert header["alive"] == N_DOCS - 5 and header["rows"] >= N_DOCS + 10  # tombstoned rows kept
    b = start(stores(), tmp_path)
    try:
        assert b.rebuilds == 0 and b.snapshots is not None and b.snapshots.last_restore is not None
        assert b.snapshots.last_restore.replayed == 0 and b.is_approximate
        assert results(b, False) == before_exact
        assert results(b, None) == before_ann  # the same HNSW graph, not a new one
        assert_same_as_rebuild(b, store)
        # the restored graph takes new documents as the built one does
        b.store.put_many([(doc(777), memory_for(777)[0], memory_for(4242)[1])], "v1")
        assert b.search(memory_for(4242)[1], 1)[0].id == "doc-777"
        assert read_header(path)["alive"] == len(b) - 1
    finally:
        b.close()
    assert read_header(path)["alive"] == len(b)  # written again at close: it had changed


def test_events_after_the_snapshot_are_replayed(tmp_path: Path, store: RedisMemoryStore, stores) -> None:
    snapshot_of_bank(stores(), tmp_path)
    # other replicas write while this one is down
    store.put_many([(doc(900 + i), *memory_for(900 + i)) for i in range(5)], "v1")
    store.put_many([(doc(50, "moved"), memory_for(50)[0], memory_for(5050)[1])], "v1")
    store.delete("doc-60")
    b_store = stores()
    snaps = IndexSnapshots(tmp_path, interval_s=0)
    load = snaps.load

    def load_racing_a_local_write(*args, **kw):  # a write through this replica while its file loads
        b_store.put_many([(doc(950), *memory_for(950))], "v1")
        return load(*args, **kw)

    snaps.load = load_racing_a_local_write  # type: ignore[method-assign]
    b = SyncedIndex(b_store, VectorIndex(approx_threshold=100), snapshots=snaps).start(follow=False)
    try:
        assert b.rebuilds == 0 and snaps.last_restore is not None and snaps.last_restore.replayed >= 7
        assert "doc-950" in b.index and "doc-904" in b.index and "doc-60" not in b.index
        assert b.search(memory_for(5050)[1], 1)[0].id == "doc-50"
        assert_same_as_rebuild(b, store)
    finally:
        b.close()


def _flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    at = int(len(data) * where)
    data[at : at + 4] = bytes(x ^ 0x5A for x in data[at : at + 4])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["keys", "graph", "header", "trailer", "truncated"])
def test_corrupt_snapshot_falls_back_to_rebuild(
    tmp_path: Path, store: RedisMemoryStore, stores, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = snapshot_of_bank(stores(), tmp_path)
    header = read_header(path)
    spec = {s["name"]: s for s in header["arrays"]}
    size = path.stat().st_size
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: size // 2])
    else:
        at = {"keys": 8 + spec["keys"]["offset"] + 1000, "graph": 8 + spec["graph"]["offset"] + 2000,
              "header": header["_payload_end"] + 40, "trailer": size - 20}[damage]
        _flip(path, at / size)
    b = start(stores(), tmp_path)
    try:
        assert b.rebuilds == 1 and b.snapshots is not None
        assert b.snapshots.last_rejection is not None
        assert any(w in b.snapshots.last_rejection for w in ("corrupt", "truncated", "magic"))
        assert any(r.levelname == "WARNING" and b.snapshots.last_rejection in r.getMessage() for r in caplog.records)
        assert_same_as_rebuild(b, store)
        wait_for(lambda: b.snapshots is not None and b.snapshots.writes == 1)  # a fresh one after the rebuild
    finally:
        b.close()
    c = start(stores(), tmp_path)
    try:
        assert c.rebuilds == 0 and len(c) == store.count()
    finally:
        c.close()


def test_snapshot_of_another_bank_or_dimension_is_refused(
    tmp_path: Path, redis_url: str, store: RedisMemoryStore, stores
) -> None:
    path = snapshot_of_bank(stores(), tmp_path)
    other = RedisMemoryStore(redis_url, bank=store.bank + "-other")
    try:
        other.put_many([(doc(i), *memory_for(i)) for i in range(20)], "v1")
        shutil.copy(path, snapshot_path(tmp_path, other.bank))  # an operator copied the wrong file
        b = start(other, tmp_path)
        try:
            assert b.rebuilds == 1 and "foreign" in (b.snapshots.last_rejection or "")  # type: ignore[union-attr]
            assert len(b) == 20 and b.search(memory_for(3)[1], 1)[0].id == "doc-3"
        finally:
            b.close()
    finally:
        other.drop_bank()
        other.close()
    c = start(stores(), tmp_path, dim=256)  # a model with other keys
    try:
        assert c.rebuilds == 1 and "dimension" in (c.snapshots.last_rejection or "")  # type: ignore[union-attr]
    finally:
        c.close()


def test_bank_dropped_and_refilled_makes_the_snapshot_stale(tmp_path: Path, store: RedisMemoryStore, stores) -> None:
    snapshot_of_bank(stores(), tmp_path)
    store.drop_bank()
    store.put_many([(doc(i), *memory_for(5000 + i)) for i in range(N_DOCS + 50)], "v1")  # as many events, and more
    b = start(stores(), tmp_path)
    try:
        assert b.rebuilds == 1 and "stale" in (b.snapshots.last_rejection or "")  # type: ignore[union-attr]
        assert b.search(memory_for(5007)[1], 1)[0].id == "doc-7"
        assert_same_as_rebuild(b, store)
    finally:
        b.close()


def test_trimmed_stream_makes_the_snapshot_stale(
    tmp_path: Path, redis_url: str, store: RedisMemoryStore, stores
) -> None:
    snapshot_of_bank(stores(), tmp_path)
    store.put_many([(doc(1000 + i), *memory_for(1000 + i)) for i in range(300)], "v1")
    with redis.Redis.from_url(redis_url) as r:  # more events than the stream keeps happened meanwhile
        r.xtrim(store.events_key, maxlen=10)
    b = start(stores(), tmp_path)
    try:
        assert b.rebuilds == 1 and "trimmed" in (b.snapshots.last_rejection or "")  # type: ignore[union-attr]
        assert "doc-1299" in b.index
        assert_same_as_rebuild(b, store)
    finally:
        b.close()


def test_index_that_disagrees_with_redis_after_replay_is_refused(
    tmp_path: Path, redis_url: str, store: RedisMemoryStore, stores
) -> None:
    snapshot_of_bank(stores(), tmp_path)
    with redis.Redis.from_url(redis_url) as r:  # lost without an event (e.g. a restore from an older backup)
        r.delete(store.doc_key("doc-5"), store.mem_key("doc-5"))
        r.zrem(store.ids_key, "doc-5")
    b = start(stores(), tmp_path)
    try:
        assert b.rebuilds == 1 and "differs from Redis" in (b.snapshots.last_rejection or "")  # type: ignore[union-attr]
        assert "doc-5" not in b.index
    finally:
        b.close()


def test_background_snapshots_only_when_changed(tmp_path: Path, store: RedisMemoryStore, stores) -> None:
    fill(store)
    snaps = IndexSnapshots(tmp_path, interval_s=0.02)
    a = SyncedIndex(stores(), VectorIndex(approx_threshold=100), snapshots=snaps).start(follow=False)
    try:
        wait_for(lambda: snaps.writes == 1)
        checks = snaps.checks
        wait_for(lambda: snaps.checks >= checks + 5)
        assert snaps.writes == 1  # nothing changed: nothing written
        a.store.put_many([(doc(4000), *memory_for(4000))], "v1")
        a.catch_up()  # its own event too: the position moves
        path = snaps.path_for(store)
        wait_for(lambda: snaps.up_to_date(a))
        assert read_header(path)["stream"]["last_id"] == a.last_id
        assert read_header(path)["alive"] == len(a) == N_DOCS + 1
        writes = snaps.writes
    finally:
        a.close()
    assert snaps.writes == writes  # unchanged since: the clean shutdown wrote nothing more


@pytest.mark.slow
def test_restart_from_snapshot_at_1e5_documents(tmp_path: Path, store: RedisMemoryStore, stores) -> None:
    n = 100_000
    keys = clustered_keys(n + 100, seed=7)  # (n + 100, 384)
    queries = keys[n:]  # (100, 384)
    fast = stores()
    memory = torch.zeros(1, keys.shape[1], dtype=torch.float16)  # the smallest memory the store takes
    key16 = torch.from_numpy(keys[:n]).half()  # (n, 384), as the service stores keys
    for s in range(0, n, 10_000):
        fast.put_many([(DocumentInput(f"d{i}", "t"), memory, key16[i]) for i in range(s, min(n, s + 10_000))], "v1")

    def timed_start() -> tuple[SyncedIndex, float]:
        t0 = time.perf_counter()
        idx = SyncedIndex(stores(), VectorIndex(), snapshots=IndexSnapshots(tmp_path, interval_s=0)).start(
            follow=False)
        return idx, time.perf_counter() - t0

    rebuilt, t_rebuild = timed_start()
    try:
        wait_for(lambda: rebuilt.snapshots is not None and rebuilt.snapshots.writes == 1)  # written after the rebuild
        assert rebuilt.rebuilds == 1 and rebuilt.is_approximate
        restored, t_restore = timed_start()
        try:
            assert restored.rebuilds == 0 and restored.is_approximate and len(restored) == n
            assert t_restore < t_rebuild / 2, (t_restore, t_rebuild)
            top = [[[h.id for h in idx.search(q, 10, approximate=a)] for q in queries]
                   for idx in (rebuilt, restored) for a in (None, False)]
            assert top[2] == top[0]  # approximate top-10 unchanged
            assert top[3] == top[1]  # exact top-10 unchanged
            recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top[2], top[3], strict=True)])
            assert recall > 0.9
        finally:
            restored.close()
    finally:
        rebuilt.close()
