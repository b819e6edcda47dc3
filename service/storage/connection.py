"""Building a redis-py client from a URL, and turning every Redis failure into one typed error.

URL schemes (the scheme says which topology, so one setting covers every deployment):
- ``redis://``, ``rediss://``, ``unix://``: one server (connection pool, hiredis parser).
- ``redis+cluster://host:port`` (or ``rediss+cluster://``): Redis Cluster via
  ``RedisCluster.from_url``; every key of a bank carries the hash tag ``{bank}``, so the
  multi-key scripts stay in one slot.
- ``redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]``: the master of
  ``service_name`` as reported by Sentinel (follows fail-overs).

Retries: one quick retry on ConnectionError/TimeoutError, so a pooled connection left stale by a
Redis restart is replaced transparently; a dead server fails fast (a clear 503), not after the
library's default seconds of back-off. A retried write is harmless: the put script is idempotent
by content hash (its *status* may then read "unchanged").
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from service.errors import InvalidInputError, StorageUnavailableError


@dataclass(frozen=True)
class ConnectionSettings:
    socket_timeout_s: float = 5.0
    connect_timeout_s: float = 1.0
    max_connections: int = 64
    retries: int = 1


def redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


def _retry(settings: ConnectionSettings) -> Retry:
    return Retry(ExponentialBackoff(cap=0.05, base=0.01), settings.retries)


def connect(url: str, settings: ConnectionSettings | None = None) -> Any:
    """A redis-py client (Redis or RedisCluster) for `url`, with binary responses."""
    s = settings or ConnectionSettings()
    scheme = urlsplit(url).scheme.lower()
    common: dict[str, Any] = {
        "socket_timeout": s.socket_timeout_s,
        "socket_connect_timeout": s.connect_timeout_s,
        "retry": _retry(s),
        "decode_responses": False,
    }
    if scheme in ("redis", "rediss", "unix"):
        pool = redis.ConnectionPool.from_url(url, max_connections=s.max_connections, **common)
        return redis.Redis(connection_pool=pool)
    if scheme in ("redis+cluster", "rediss+cluster"):
        from redis.cluster import RedisCluster

        plain = url.replace("+cluster", "", 1)
        return RedisCluster.from_url(plain, max_connections=s.max_connections, **common)
    if scheme == "redis+sentinel":
        return _sentinel_master(url, s, common)
    raise InvalidInputError(
        f"unsupported Redis URL scheme {scheme!r} in {redact(url)}; use redis://, rediss://, unix://, "
        "redis+cluster:// or redis+sentinel://host:port/service_name"
    )


def _sentinel_master(url: str, s: ConnectionSettings, common: dict[str, Any]) -> Any:
    from redis.sentinel import Sentinel

    parts = urlsplit(url)
    netloc = parts.netloc
    password = None
    if "@" in netloc:
        creds, netloc = netloc.rsplit("@", 1)
        password = unquote(creds.split(":", 1)[1]) if ":" in creds else None
    hosts = []
    for hp in netloc.split(","):
        host, _, port = hp.rpartition(":")
        hosts.append((host or "127.0.0.1", int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise InvalidInputError(f"Sentinel URL {redact(url)} needs a service name: redis+sentinel://host:port/mymaster")
    service, db = path[0], int(path[1]) if len(path) > 1 else 0
    sentinel = Sentinel(
        hosts,
        socket_timeout=s.socket_timeout_s,
        socket_connect_timeout=s.connect_timeout_s,
        sentinel_kwargs={"socket_timeout": s.socket_timeout_s, "socket_connect_timeout": s.connect_timeout_s},
    )
    return sentinel.master_for(service, db=db, password=password, **common)


@contextlib.contextmanager
def guard(op: str, url: str) -> Iterator[None]:
    """Map every Redis-side failure to StorageUnavailableError with a message that says what failed."""
    try:
        yield
    except (RedisError, RedisClusterException) as exc:
        raise StorageUnavailableError(
            f"Redis {op} failed at {redact(url)}: {type(exc).__name__}: {exc}",
            details={"op": op, "backend": "redis", "cause": type(exc).__name__},
        ) from exc
