from __future__ import annotations

import inspect
from datetime import UTC, datetime, timedelta, timezone

import pytest
import redis
import torch

from service.errors import InvalidInputError, StaleMemoryError, StorageUnavailableError
from service.storage import codec
from service.storage.base import DocumentInput, MemoryStore, MemoryWrite
from service.storage.redis_store import RedisMemoryStore
from service.storage.sync import SyncedIndex

from .helpers import doc, memory_for, published


def test_is_a_memory_store(store: RedisMemoryStore) -> None:
    assert isinstance(store, MemoryStore)
    assert store.ping()


def test_memory_store_protocol_declares_the_store_methods_as_implemented() -> None:
    # Callers type MemoryStore: every method they may call must exist with the same parameters.
    methods = [n for n, v in vars(MemoryStore).items()
               if callable(v) and (not n.startswith("_") or n in ("__enter__", "__exit__"))]
    assert {"put_many", "get_memories", "get_docs_meta", "bank_stats", "stream_position", "read_events"} <= set(methods)
    for name in methods:
        declared = inspect.signature(getattr(MemoryStore, name)).parameters.values()
        actual = inspect.signature(getattr(RedisMemoryStore, name)).parameters.values()
        assert [(p.name, p.kind, p.default) for p in declared] == [(p.name, p.kind, p.default) for p in actual], name
    assert "bank" in MemoryStore.__annotations__


def test_every_operation_is_reported_to_the_observer_with_its_failure(redis_url: str, bank: str) -> None:
    calls: list[tuple[str, float, StorageUnavailableError | None]] = []
    store = RedisMemoryStore(redis_url, bank=bank, on_operation=lambda *call: calls.append(call))
    try:
        store.put_many([(doc(1), *memory_for(1))], "v1")
        store.get("doc-1")
        assert [(op, err) for op, _, err in calls] == [("put_many", None), ("get", None)]
        assert all(seconds >= 0 for _, seconds, _ in calls)
    finally:
        store.drop_bank()
        store.close()
    calls.clear()
    down = RedisMemoryStore("redis://127.0.0.1:1/0", on_operation=lambda *call: calls.append(call))  # nothing on port 1
    with pytest.raises(StorageUnavailableError):
        down.ping()
    down.close()
    [(op, _, error)] = calls
    assert op == "ping" and isinstance(error, StorageUnavailableError) and error.details["cause"] == "ConnectionError"


def test_bank_stats_are_exact_then_sampled_and_memory_bytes_are_what_redis_stores(
    redis_url: str, store: RedisMemoryStore
) -> None:
    texts = [("x" * (10 + i)) for i in range(60)]
    # fp32 memory and key: stored as an fp16 memory and an fp32 key
    store.put_many([MemoryWrite(DocumentInput(id=f"d{i}", text=t), torch.randn(4, 8), torch.randn(8))
                    for i, t in enumerate(texts)], "cv1")
    size = lambda cv: codec.encoded_size(4, 8, cv, key_dtype=torch.float32)  # noqa: E731
    exact = store.bank_stats(size, sample=100)
    assert (exact.documents, exact.text_bytes, exact.text_sampled) == (60, sum(map(len, texts)), 60)
    r = redis.Redis.from_url(redis_url)
    try:
        stored = sum(r.strlen(store.mem_key(f"d{i}")) for i in range(60))
    finally:
        r.close()
    assert exact.memories_by_version == {"cv1": 60} and exact.memory_bytes == stored
    est = store.bank_stats(size, sample=20)
    assert est.text_sampled == 20 and abs(est.text_bytes - exact.text_bytes) < 0.35 * exact.text_bytes


def test_round_trip_documents_and_memories_bit_exact(store: RedisMemoryStore) -> None:
    pub = datetime(2024, 2, 1, 12, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    items = []
    for i in range(20):
        m, k = memory_for(i)
        d = doc(i, text=f"Ünïcode text {i} \n with lines", title=None if i % 2 else f"T{i}",
                source="reuters" if i % 3 else None, published_at=pub if i % 2 else None)
        items.append(MemoryWrite(d, m, k))
    res = store.put_many(items, "v1")
    assert [r.status for r in res] == ["new"] * 20 and all(r.version == 1 for r in res)
    assert all(r.memory_bytes > 16 * 384 * 2 for r in res)
    got = store.get_memories([f"doc-{i}" for i in range(20)] + ["missing"])
    assert got[-1] is None
    for i, sm in enumerate(got[:-1]):
        m, k = memory_for(i)
        assert sm is not None and sm.doc_id == f"doc-{i}" and sm.compressor_version == "v1"
        assert sm.memory.dtype == torch.float16 and torch.equal(sm.memory, m) and torch.equal(sm.key, k)
        rec = store.get(f"doc-{i}")
        assert rec is not None and rec.text == items[i].doc.text and rec.title == items[i].doc.title
        assert rec.source == items[i].doc.source and rec.version == 1
        assert rec.published_at == (pub if i % 2 else None)
        assert rec.received_at.tzinfo is not None and rec.compressor_version == "v1"
    assert store.get("missing") is None
    assert store.count() == 20


def test_idempotent_and_versioned(store: RedisMemoryStore) -> None:
    m, k = memory_for(1)
    assert store.put_many([(doc(1, "hello"), m, k)], "v1")[0].status == "new"
    before = store.read_events("0-0")
    r = store.put_many([(doc(1, "hello", title="ignored"), memory_for(2)[0], k)], "v1")[0]
    assert (r.status, r.version) == ("unchanged", 1)
    assert store.read_events("0-0") == before  # nothing rewritten, no event
    sm = store.get_memories(["doc-1"])[0]
    assert sm is not None and torch.equal(sm.memory, m)
    assert store.get("doc-1").title is None  # type: ignore[union-attr]
    m3, k3 = memory_for(3)
    r = store.put_many([(doc(1, "hello, edited", title="T"), m3, k3)], "v1")[0]
    assert (r.status, r.version) == ("replaced", 2)
    rec = store.get("doc-1")
    assert rec is not None and rec.text == "hello, edited" and rec.title == "T" and rec.version == 2
    sm = store.get_memories(["doc-1"])[0]
    assert sm is not None and torch.equal(sm.memory, m3) and torch.equal(sm.key, k3)
    # same text under a new compressor: memory refreshed, version unchanged
    r = store.put_many([(doc(1, "hello, edited"), m, k)], "v2")[0]
    assert (r.status, r.version) == ("replaced", 2)
    assert store.count() == 1 and store.version_counts() == {"v2": 1}


def test_delete_visible_to_local_index_immediately(store: RedisMemoryStore) -> None:
    idx = SyncedIndex(store).start(follow=False)  # no follower: only the local listener can update it
    try:
        items = [(doc(i), *memory_for(i)) for i in range(10)]
        store.put_many(items, "v1")
        q = items[3][2]
        assert idx.search(q, 1)[0].id == "doc-3"
        assert store.delete("doc-3") is True
        assert "doc-3" not in [h.id for h in idx.search(q, 10)]
        assert store.get("doc-3") is None and store.get_memories(["doc-3"]) == [None]
        assert store.delete("doc-3") is False
        assert store.count() == 9 and len(idx) == 9
    finally:
        idx.close()


def test_list_and_count_paging(store: RedisMemoryStore) -> None:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    items = [(doc(i, received_at=t0 + timedelta(seconds=i)), *memory_for(i)) for i in range(25)]
    store.put_many(items, "v1")
    page1, page2, page3 = store.list(0, 10), store.list(10, 10), store.list(20, 10)
    assert [r.id for r in page1 + page2 + page3] == [f"doc-{i}" for i in range(25)]
    assert store.list(30, 10) == [] and store.count() == 25
    with pytest.raises(InvalidInputError):
        store.list(-1, 10)


def test_stale_memories_never_returned_for_another_version(store: RedisMemoryStore) -> None:
    store.put_many([(doc(1), *memory_for(1))], "v1")
    assert store.get_memories(["doc-1"], compressor_version="v2") == [None]
    with pytest.raises(StaleMemoryError):
        store.get_memories(["doc-1"], compressor_version="v2", stale="raise")
    assert store.stale_count("v2") == 1 and store.stale_count("v1") == 0


def test_invalid_batch_writes_nothing(store: RedisMemoryStore) -> None:
    good = (doc(1), *memory_for(1))
    bad = (doc(2), torch.randn(16, 384).half(), torch.randn(2, 384))  # a key must be one vector
    with pytest.raises(InvalidInputError, match="doc-2"):
        store.put_many([good, bad], "v1")
    with pytest.raises(InvalidInputError):
        store.put_many([(DocumentInput("x", "   "), *memory_for(1))], "v1")
    with pytest.raises(InvalidInputError, match="timezone"):
        store.put_many([(DocumentInput("x", "t", published_at=datetime(2024, 1, 1)), *memory_for(1))], "v1")
    assert store.count() == 0


def test_index_entries_carry_metadata(store: RedisMemoryStore) -> None:
    store.put_many([(doc(i, source=f"s{i % 2}", published_at=published(i)), *memory_for(i)) for i in range(5)], "v1")
    entries = [e for batch in store.iter_index_entries(2) for e in batch]
    assert sorted(e.id for e in entries) == [f"doc-{i}" for i in range(5)]
    e = next(e for e in entries if e.id == "doc-3")
    assert e.source == "s1" and e.published_at == published(3) and e.compressor_version == "v1"
    assert torch.equal(torch.from_numpy(e.key), memory_for(3)[1])


def test_bank_isolation(redis_url: str, store: RedisMemoryStore) -> None:
    other = RedisMemoryStore(redis_url, bank=store.bank + "-other")
    try:
        store.put_many([(doc(1), *memory_for(1))], "v1")
        assert other.get("doc-1") is None and other.count() == 0
    finally:
        other.drop_bank()
        other.close()
    with pytest.raises(InvalidInputError):
        RedisMemoryStore(redis_url, bank="bad{bank}")
