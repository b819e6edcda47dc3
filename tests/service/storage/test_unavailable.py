"""Redis down: a clear typed error, fast; Redis back: the same objects work again, no restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.errors import StorageUnavailableError
from service.storage.embedded import EmbeddedRedis, free_port
from service.storage.redis_store import RedisMemoryStore
from service.storage.sync import SyncedIndex

from .helpers import doc, memory_for


def test_dead_port_gives_typed_error_fast() -> None:
    store = RedisMemoryStore(f"redis://127.0.0.1:{free_port()}/0", bank="x")
    calls = [
        lambda: store.ping(),
        lambda: store.get("a"),
        lambda: store.get_memories(["a"]),
        lambda: store.put_many([(doc(1), *memory_for(1))], "v1"),
        lambda: store.delete("a"),
        lambda: store.count(),
    ]
    for call in calls:
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailableError) as info:
            call()
        assert time.monotonic() - t0 < 2.0
        assert "Redis" in info.value.message and "127.0.0.1" in info.value.message
        assert info.value.http_status == 503 and info.value.code == "storage_unavailable"


def test_recovers_without_restart_when_redis_is_back(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "redis"
    server = EmbeddedRedis(data, port=port).start()
    store = RedisMemoryStore(server.url, bank="rec")
    idx = SyncedIndex(store, block_ms=50).start()
    writer = RedisMemoryStore(server.url, bank="rec")
    try:
        store.put_many([(doc(1), *memory_for(1))], "v1")
        server.stop()  # Redis goes away under pooled connections and a blocked XREAD
        with pytest.raises(StorageUnavailableError):
            store.get("doc-1")
        with pytest.raises(StorageUnavailableError):
            store.put_many([(doc(2), *memory_for(2))], "v1")
        assert idx.search(memory_for(1)[1], 1)[0].id == "doc-1"  # the index keeps serving
        t0 = time.monotonic()
        while idx.last_error is None:  # the follower notices, and keeps retrying
            assert time.monotonic() - t0 < 30.0, "the follower did not notice that Redis is gone"
            time.sleep(0.02)
        server = EmbeddedRedis(data, port=port).start()  # same address, data reloaded from AOF
        rec = store.get("doc-1")  # same store object, stale pool connections replaced
        assert rec is not None and rec.text == "document number 1"
        assert store.put_many([(doc(2), *memory_for(2))], "v1")[0].status == "new"
        writer.put_many([(doc(3), *memory_for(3))], "v1")  # another replica's write reaches the index
        t0 = time.monotonic()
        while idx.search(memory_for(3)[1], 1)[0].id != "doc-3":
            assert time.monotonic() - t0 < 30.0, "follower did not recover"
            time.sleep(0.02)
    finally:
        idx.close()
        store.close()
        writer.close()
        server.stop()
