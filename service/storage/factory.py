"""`open_bank(settings)`: the one way from settings to a ready memory bank (service, `cmt-reindex`).

With `settings.redis_url` the bank lives on that Redis. Without one, it lives on the embedded
redis-server whose folder is `settings.data_dir` itself (AOF, `server.json`, log): the server is
started there, or reused when another process already serves that folder, and a server started
here is stopped when the store is closed.
"""

from __future__ import annotations

import logging

from service.settings import Settings
from service.storage.base import MemoryStore, OperationObserver
from service.storage.embedded import EmbeddedRedis
from service.storage.redis_store import RedisMemoryStore

log = logging.getLogger(__name__)


def open_bank(settings: Settings, *, on_operation: OperationObserver | None = None) -> MemoryStore:
    """The bank `settings.bank` on `settings.redis_url`, or on the embedded server in `settings.data_dir`.

    `on_operation` is told every store operation (metrics). Blocking (starts a server): call it
    off the event loop.
    """
    if settings.redis_url:
        return RedisMemoryStore(settings.redis_url, bank=settings.bank, on_operation=on_operation)
    server = EmbeddedRedis(settings.data_dir, appendfsync=settings.appendfsync).start()
    log.info("embedded redis at %s (AOF in %s)", server.url, server.data_dir)
    try:
        return RedisMemoryStore(server.url, bank=settings.bank, on_operation=on_operation, on_close=server.stop)
    except BaseException:
        server.stop()
        raise


__all__ = ["open_bank"]
