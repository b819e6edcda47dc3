from __future__ import annotations

import time
from collections.abc import Callable

import redis

from service.storage.redis_store import RedisMemoryStore
from service.storage.sync import SyncedIndex

from .helpers import doc, memory_for


def wait_for(cond: Callable[[], bool], timeout_s: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(0.005)
    return time.monotonic() - t0


def top_ids(idx: SyncedIndex, i: int, k: int = 5) -> list[str]:
    return [h.id for h in idx.search(memory_for(i)[1], k)]


def test_two_instances_see_each_others_writes(redis_url: str, store: RedisMemoryStore) -> None:
    other_store = RedisMemoryStore(redis_url, bank=store.bank)
    store.put_many([(doc(i), *memory_for(i)) for i in range(50)], "v1")  # before B starts: rebuilt by scan
    a = SyncedIndex(store).start()
    b = SyncedIndex(other_store).start()
    try:
        assert len(a) == len(b) == 50
        store.put_many([(doc(100), *memory_for(100))], "v1")
        assert top_ids(a, 100)[0] == "doc-100"  # own write: immediate
        # how fast is bench/bench_storage.py's business: here only that it arrives (a loaded CI machine is slow)
        wait_for(lambda: top_ids(b, 100)[0] == "doc-100", 30.0)
        other_store.delete("doc-7")
        assert "doc-7" not in top_ids(b, 7)
        wait_for(lambda: "doc-7" not in top_ids(a, 7), 30.0)
        # a replace through B (new text, new key) moves the doc in A's index too
        other_store.put_many([(doc(8, "edited"), memory_for(8)[0], memory_for(999)[1])], "v1")
        wait_for(lambda: top_ids(a, 999)[0] == "doc-8", 30.0)
        assert len(a) == len(b) == 50
    finally:
        a.close()
        b.close()
        other_store.close()


def test_events_racing_with_startup_scan_are_not_lost(redis_url: str, store: RedisMemoryStore) -> None:
    store.put_many([(doc(i), *memory_for(i)) for i in range(20)], "v1")
    b_store = RedisMemoryStore(redis_url, bank=store.bank)
    b = SyncedIndex(b_store, batch_size=5)
    it = b_store.iter_index_entries

    def slow_scan(batch_size: int = 1000):  # writes land between the stream position read and the scan
        store.put_many([(doc(500), *memory_for(500))], "v1")
        store.delete("doc-0")
        yield from it(batch_size)

    b_store.iter_index_entries = slow_scan  # type: ignore[method-assign]
    try:
        b.start(follow=False)
        b.sync()
        assert "doc-500" in b.index and "doc-0" not in b.index and len(b) == 20
    finally:
        b.close()
        b_store.close()


def test_trimmed_stream_gap_triggers_rebuild(redis_url: str, store: RedisMemoryStore) -> None:
    b_store = RedisMemoryStore(redis_url, bank=store.bank)
    b = SyncedIndex(b_store, gap_check_s=0.0).start(follow=False)
    try:
        store.put_many([(doc(i), *memory_for(i)) for i in range(300)], "v1")
        with redis.Redis.from_url(redis_url) as r:  # an operator's trim: B fell behind more than the stream keeps
            r.xtrim(store.events_key, maxlen=10)
        b.sync()
        assert b.rebuilds == 2 and len(b) == 300
    finally:
        b.close()
        b_store.close()
