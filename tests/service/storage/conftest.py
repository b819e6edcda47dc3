"""Fixtures: a real Redis (the shared one on 127.0.0.1:6379, else one started here), a unique bank
per test (dropped afterwards), and own redis-server processes for durability/outage tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.storage.embedded import EmbeddedRedis
from service.storage.redis_store import RedisMemoryStore

SHARED_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        redis.Redis.from_url(SHARED_URL, socket_connect_timeout=0.5).ping()
        yield SHARED_URL
        return
    except (redis.RedisError, OSError):
        pass
    server = EmbeddedRedis(tmp_path_factory.mktemp("shared-redis"), appendfsync="no").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def bank() -> str:
    return "test-" + uuid.uuid4().hex[:12]


@pytest.fixture
def store(redis_url: str, bank: str) -> Iterator[RedisMemoryStore]:
    s = RedisMemoryStore(redis_url, bank=bank)
    try:
        yield s
    finally:
        s.drop_bank()
        s.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server owned by the test, with AOF (appendfsync always) in a tmp dir."""
    server = EmbeddedRedis(tmp_path / "redis", appendfsync="always").start()
    try:
        yield server
    finally:
        server.stop()
