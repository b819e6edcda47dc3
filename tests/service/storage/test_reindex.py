from __future__ import annotations

import pytest
import torch

from service.storage.redis_store import RedisMemoryStore
from service.storage.reindex import reindex
from service.storage.sync import SyncedIndex

from .helpers import doc, memory_for


def compress_v2(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic 'new compressor': memory and key derived from the text."""
    mems, keys = [], []
    for t in texts:
        m, k = memory_for(10_000 + int(t.split()[-1]))
        mems.append(m)
        keys.append(k)
    return torch.stack(mems), torch.stack(keys)  # (B, 16, 384), (B, 384)


class Boom(RuntimeError):
    pass


def test_reindex_is_resumable_and_never_mixes_versions(store: RedisMemoryStore) -> None:
    store.put_many([(doc(i), *memory_for(i)) for i in range(40)], "v1")
    idx = SyncedIndex(store).start(follow=False)
    calls = {"n": 0}

    def flaky(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise Boom("checkpoint crashed mid-run")
        return compress_v2(texts)

    try:
        with pytest.raises(Boom):
            reindex(store, flaky, "v2", batch_size=8, progress=False)
        assert store.stale_count("v2") == 24 and idx.stale_count("v2") == 24  # 2 batches done
        # mid-reindex: v2 questions only ever see v2 memories
        for i in range(40):
            hits = idx.search(memory_for(10_000 + i)[1], 40, compressor_version="v2")
            assert len(hits) == 16 and all(h.compressor_version == "v2" for h in hits)
        mems = store.get_memories([f"doc-{i}" for i in range(40)], compressor_version="v2")
        assert sum(m is not None for m in mems) == 16
        stats = reindex(store, compress_v2, "v2", batch_size=8, progress=False)  # resume
        assert stats.skipped == 16 and stats.updated == 24
        assert store.stale_count("v2") == 0 and store.version_counts() == {"v2": 40}
        for i, sm in enumerate(store.get_memories([f"doc-{i}" for i in range(40)], compressor_version="v2")):
            m, k = memory_for(10_000 + i)
            assert sm is not None and torch.equal(sm.memory, m) and torch.equal(sm.key, k)
        assert idx.search(memory_for(10_005)[1], 1, compressor_version="v2")[0].id == "doc-5"
        rec = store.get("doc-5")
        assert rec is not None and rec.version == 1 and rec.compressor_version == "v2"
    finally:
        idx.close()


def test_concurrent_edit_wins_over_reindex(store: RedisMemoryStore) -> None:
    store.put_many([(doc(1), *memory_for(1))], "v1")
    h = store.get("doc-1").content_hash  # type: ignore[union-attr]
    store.put_many([(doc(1, "edited 7"), *memory_for(7))], "v1")  # edit lands after reindex read the text
    m, k = memory_for(99)
    assert store.update_memories([("doc-1", h, m, k), ("doc-gone", h, m, k)], "v2") == ["changed", "gone"]
    sm = store.get_memories(["doc-1"])[0]
    assert sm is not None and sm.compressor_version == "v1" and torch.equal(sm.memory, memory_for(7)[0])
