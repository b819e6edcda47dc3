"""`open_bank(settings)`: the one way from settings to a ready memory bank (service, `cmt-reindex`).

With `settings.redis_url` the bank lives on that Redis. Without one, it lives on the embedded
redis-server whose folder is `settings.data_dir` itself (AOF, `server.json`, log): the server is
started there, or reused when another process already serves that folder, and a server started
here is stopped when the store is closed, and supervised while it runs: if it dies it is started
again from its AOF on the same port (`EmbeddedRedis.supervise`), and `on_server_restart` is told.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from service.settings import Settings
from service.storage.base import MemoryStore, OperationObserver
from service.storage.embedded import EmbeddedRedis
from service.storage.redis_store import RedisMemoryStore
from service.storage.replication import ReplicaAcks, default_wait_replicas

log = logging.getLogger(__name__)


def open_bank(
    settings: Settings, *, on_operation: OperationObserver | None = None,
    on_server_restart: Callable[[int], None] | None = None,
) -> MemoryStore:
    """The bank `settings.bank` on `settings.redis_url`, or on the embedded server in `settings.data_dir`.

    `on_operation` is told every store operation (metrics); `on_server_restart(restarts)` each time
    the supervisor started the embedded server again. Blocking (starts a server): call it off the
    event loop.
    """
    if settings.redis_url:
        replicas = settings.redis_wait_replicas
        acks = ReplicaAcks(default_wait_replicas(settings.redis_url) if replicas is None else replicas,
                           settings.redis_wait_timeout_ms)
        return RedisMemoryStore(settings.redis_url, bank=settings.bank, on_operation=on_operation, replica_acks=acks)
    server = EmbeddedRedis(settings.data_dir, appendfsync=settings.appendfsync).start()
    if on_server_restart is not None:
        server.add_restart_listener(on_server_restart)
    server.supervise()
    log.info("embedded redis at %s (AOF in %s)", server.url, server.data_dir)
    try:
        return RedisMemoryStore(server.url, bank=settings.bank, on_operation=on_operation, on_close=server.stop)
    except BaseException:
        server.stop()
        raise


__all__ = ["open_bank"]
