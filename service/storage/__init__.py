"""The memory bank: documents and their CMT memories in Redis, with an in-process top-k index.

    store = open_store(StorageConfig(url="redis://127.0.0.1:6379/0", bank="news"))
    index = SyncedIndex(store).start()          # rebuilt from Redis, follows other replicas
    store.put_many([(DocumentInput("a", "text"), memory, key)], compressor_version="v1")
    hits = index.search(question_key, 8, compressor_version="v1")
    memories = store.get_memories([h.id for h in order_chronologically(hits)], compressor_version="v1")
"""

from service.storage.base import (
    DocumentInput,
    DocumentRecord,
    IndexEntry,
    MemoryStore,
    MemoryWrite,
    PutResult,
    StoredMemory,
)
from service.storage.codec import CorruptMemoryError
from service.storage.embedded import EmbeddedRedis
from service.storage.factory import StorageConfig, open_store
from service.storage.index import SearchHit, VectorIndex, order_chronologically
from service.storage.redis_store import RedisMemoryStore
from service.storage.reindex import ReindexStats, reindex
from service.storage.sync import SyncedIndex

__all__ = [
    "CorruptMemoryError",
    "DocumentInput",
    "DocumentRecord",
    "EmbeddedRedis",
    "IndexEntry",
    "MemoryStore",
    "MemoryWrite",
    "PutResult",
    "RedisMemoryStore",
    "ReindexStats",
    "SearchHit",
    "StorageConfig",
    "StoredMemory",
    "SyncedIndex",
    "VectorIndex",
    "open_store",
    "order_chronologically",
    "reindex",
]
