"""One entry point from configuration to a ready store: a URL, or the embedded server."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from service.storage.connection import ConnectionSettings
from service.storage.embedded import EmbeddedRedis
from service.storage.redis_store import RedisMemoryStore


@dataclass(frozen=True)
class StorageConfig:
    url: str | None = None  # None: start/reuse the embedded redis-server in data_dir
    bank: str = "default"
    data_dir: str | Path = "./data"
    appendfsync: str = "always"  # embedded server only; see embedded.py for why
    stream_maxlen: int = 100_000
    max_batch: int = 256
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)


def open_store(config: StorageConfig) -> RedisMemoryStore:
    """A store on `config.url`, or on an embedded server (stopped when the store is closed)."""
    if config.url:
        return RedisMemoryStore(config.url, bank=config.bank, stream_maxlen=config.stream_maxlen,
                                max_batch=config.max_batch, settings=config.connection)
    server = EmbeddedRedis(Path(config.data_dir) / "redis", appendfsync=config.appendfsync).start()
    try:
        return RedisMemoryStore(server.url, bank=config.bank, stream_maxlen=config.stream_maxlen,
                                max_batch=config.max_batch, settings=config.connection, on_close=server.stop)
    except BaseException:
        server.stop()
        raise
