"""The memory bank: documents and their CMT memories in Redis, with an in-process top-k index.

    from service.settings import Settings
    from service.storage import DocumentInput, MemoryWrite, SearchFilters, SyncedIndex, open_bank

    store = open_bank(Settings(redis_url="redis://127.0.0.1:6379/0", bank="news"))  # no URL: embedded Redis
    with store, SyncedIndex(store).start() as index:   # rebuilt from Redis, follows other replicas
        store.put_many([MemoryWrite(DocumentInput("a", "text", source="wire"), memory, key)], compressor_version="v1")
        hits = index.search(question_key, 8, SearchFilters(source=("wire",)), compressor_version="v1")
        memories = store.get_memories([h.id for h in hits], compressor_version="v1")  # None: deleted meanwhile
    # serving orders the hits newest first (service.runtime.ask.hits_newest_first) before ψ reads them
"""

from service.storage.base import (
    BankStats,
    DocumentInput,
    DocumentRecord,
    IndexEntry,
    MemoryStore,
    MemoryWrite,
    PutResult,
    SearchFilters,
    StoredMemory,
)
from service.storage.codec import CorruptMemoryError
from service.storage.embedded import EmbeddedRedis
from service.storage.factory import open_bank
from service.storage.index import SearchHit, VectorIndex
from service.storage.redis_store import RedisMemoryStore
from service.storage.reindex import ReindexStats, reindex
from service.storage.sync import SyncedIndex

__all__ = [
    "BankStats",
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
    "SearchFilters",
    "SearchHit",
    "StoredMemory",
    "SyncedIndex",
    "VectorIndex",
    "open_bank",
    "reindex",
]
