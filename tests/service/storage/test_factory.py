"""`open_bank(settings)`: the one way the service and `cmt-reindex` open the memory bank."""

from __future__ import annotations

import ast
import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis

import service.app
import service.cli
from service.settings import Settings
from service.storage.factory import open_bank
from service.storage.redis_store import RedisMemoryStore

from .helpers import doc, memory_for


def test_data_dir_is_the_embedded_redis_folder_itself(tmp_path: Path) -> None:
    # The service used data_dir as the Redis folder, the old factory data_dir/"redis": one meaning now.
    folder = tmp_path / "bank-redis"
    with open_bank(Settings(redis_url=None, data_dir=folder, bank="factory")) as store:
        assert isinstance(store, RedisMemoryStore)
        r = redis.Redis.from_url(store.url)
        try:
            assert Path(r.config_get("dir")["dir"]) == folder.resolve()
        finally:
            r.close()
        assert json.loads((folder / "server.json").read_text())["pid"] > 0
    assert not (folder / "redis").exists()


def test_open_bank_on_a_url_reports_every_operation(redis_url: str, bank: str) -> None:
    calls: list[str] = []
    with open_bank(Settings(redis_url=redis_url, bank=bank), on_operation=lambda op, s, e: calls.append(op)) as store:
        assert store.bank == bank and store.count() == 0
    assert calls == ["count"]


def test_service_and_cmt_reindex_open_the_bank_only_through_open_bank() -> None:
    for module in (service.app, service.cli):
        tree = ast.parse(Path(module.__file__).read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert "open_bank" in names, module.__name__
        assert not names & {"EmbeddedRedis", "RedisMemoryStore"}, module.__name__


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_killed_embedded_redis_comes_back_on_its_port_with_every_acknowledged_write(tmp_path: Path) -> None:
    restarts: list[int] = []
    folder = tmp_path / "bank-redis"
    with open_bank(Settings(redis_url=None, data_dir=folder, bank="heal"), on_server_restart=restarts.append) as store:
        store.put_many([(doc(i), *memory_for(i)) for i in range(20)], "v1")  # acknowledged: fsynced to the AOF
        pid = json.loads((folder / "server.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)  # as the OOM killer would
        _wait_for(lambda: restarts == [1])
        assert json.loads((folder / "server.json").read_text())["pid"] != pid
        assert store.count() == 20 and store.get("doc-7").text == "document number 7"  # same URL, data from the AOF
        store.put_many([(doc(20), *memory_for(20))], "v1")
        assert store.count() == 21
    with redis.Redis.from_url(store.url, socket_connect_timeout=0.5) as r:  # closed: stopped, not restarted again
        with pytest.raises(redis.ConnectionError):
            r.ping()
    assert restarts == [1]
