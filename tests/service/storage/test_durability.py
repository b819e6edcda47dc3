"""kill -9 the writer mid-ingest, then crash/restart Redis: every acknowledged document is there,
complete, and nothing half-written is visible."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch

from service.storage.embedded import EmbeddedRedis
from service.storage.redis_store import RedisMemoryStore

from .helpers import memory_for

ROOT = Path(__file__).resolve().parents[3]


def ingest_and_kill(url: str, bank: str, min_acks: int) -> list[str]:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.service.storage.ingest_child", url, bank, "100000", "8"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    acked: list[str] = []
    assert child.stdout is not None
    for line in child.stdout:
        acked.append(line.strip())
        if len(acked) >= min_acks:
            break
    os.kill(child.pid, signal.SIGKILL)  # mid-ingest: a batch is usually in flight
    child.wait()
    acked += [ln.strip() for ln in child.stdout.read().splitlines() if ln.strip()]  # flushed before the kill
    assert child.returncode == -signal.SIGKILL
    return acked


def check_consistent(store: RedisMemoryStore, acked: list[str]) -> None:
    r = store._r
    docs = {k.decode().rsplit(":", 1)[1] for k in r.scan_iter(match=store.doc_key("*"), count=1000)}
    mems = {k.decode().rsplit(":", 1)[1] for k in r.scan_iter(match=store.mem_key("*"), count=1000)}
    ids = {m.decode() for m in r.zrange(store.ids_key, 0, -1)}
    assert docs == mems == ids, "a document without its memory (or the reverse) is visible"
    assert set(acked) <= docs, f"{len(set(acked) - docs)} acknowledged documents lost"
    assert store.version_counts() == {"v1": len(ids)}
    for start in range(0, len(acked), 200):
        batch = acked[start : start + 200]
        for doc_id, sm in zip(batch, store.get_memories(batch), strict=True):
            i = int(doc_id.split("-")[1])
            m, k = memory_for(i)
            assert sm is not None and torch.equal(sm.memory, m) and torch.equal(sm.key, k), doc_id
            rec = store.get(doc_id)
            assert rec is not None and rec.text == f"document number {i}"


@pytest.mark.slow
@pytest.mark.parametrize("appendfsync,redis_crash", [("always", "kill9"), ("everysec", "shutdown-nosave")])
def test_acknowledged_documents_survive_writer_kill_and_redis_restart(
    tmp_path: Path, appendfsync: str, redis_crash: str
) -> None:
    data = tmp_path / "redis"
    server = EmbeddedRedis(data, appendfsync=appendfsync).start()
    try:
        acked = ingest_and_kill(server.url, "dur", min_acks=600)
        assert len(acked) >= 600
        # now take Redis down hard (kill -9 is only safe after ack with appendfsync=always)
        if redis_crash == "kill9":
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
        else:
            try:
                redis.Redis.from_url(server.url).shutdown(nosave=True)
            except redis.ConnectionError:
                pass
            assert server.proc is not None
            server.proc.wait(timeout=10)
        server.owned = False  # it is gone; don't try to stop it
        server = EmbeddedRedis(data, appendfsync=appendfsync).start()  # reloads the AOF
        assert server.owned  # the dead one was not "reused"
        store = RedisMemoryStore(server.url, bank="dur")
        try:
            check_consistent(store, acked)
        finally:
            store.close()
    finally:
        server.stop()
