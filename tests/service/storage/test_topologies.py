"""Redis Cluster (one node owning all slots: CROSSSLOT rules are enforced as on a real cluster)
and Sentinel (a sentinel naming the master) URLs, each against real server processes."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.storage.embedded import free_port, wait_until_answers
from service.storage.redis_store import RedisMemoryStore
from service.storage.replication import ReplicaAcks
from service.storage.sync import SyncedIndex

from .helpers import doc, memory_for


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def exercise(store: RedisMemoryStore) -> None:
    idx = SyncedIndex(store).start(follow=False)
    try:
        res = store.put_many([(doc(i, source="s"), *memory_for(i)) for i in range(10)], "v1")
        assert [r.status for r in res] == ["new"] * 10
        got = store.get_memories([f"doc-{i}" for i in range(10)])
        assert all(g is not None and g.memory.equal(memory_for(i)[0]) for i, g in enumerate(got))
        assert store.get("doc-3").text == "document number 3"  # type: ignore[union-attr]
        assert store.delete("doc-3") and store.count() == 9 and len(store.list(0, 100)) == 9
        assert idx.search(memory_for(4)[1], 1)[0].id == "doc-4"
        assert idx.sync() >= 1
        other = SyncedIndex(store).start(follow=False)  # rebuild by scan works there too
        assert len(other) == 9
        other.close()
    finally:
        idx.close()


def test_cluster_url(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    port, bus_port = free_port(), free_port()  # explicit bus port: the default port+10000 can exceed 65535
    procs.append(_spawn([
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
        "--cluster-port", str(bus_port),
        "--cluster-config-file", str(tmp_path / "nodes.conf"), "--dir", str(tmp_path), "--save", "",
        "--appendonly", "no",
    ]))
    wait_until_answers(f"redis://127.0.0.1:{port}/0", 30.0, procs[0])
    r = redis.Redis(port=port)
    r.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    t0 = time.monotonic()
    while b"cluster_state:ok" not in r.execute_command("CLUSTER", "INFO"):
        assert time.monotonic() - t0 < 30
        time.sleep(0.05)
    r.close()
    # one node, no replica: acknowledged writes (on by default for cluster URLs) are test_failover.py's subject
    store = RedisMemoryStore(f"redis+cluster://127.0.0.1:{port}", bank="clu", replica_acks=ReplicaAcks(0))
    assert type(store._r).__name__ == "RedisCluster"
    try:
        exercise(store)
    finally:
        store.drop_bank()
        store.close()


def test_sentinel_url(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    mport, sport = free_port(), free_port()
    procs.append(_spawn(["redis-server", "--port", str(mport), "--bind", "127.0.0.1", "--save", "",
                         "--dir", str(tmp_path)]))
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sport}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {mport} 1\n")
    procs.append(_spawn(["redis-server", str(conf), "--sentinel"]))
    wait_until_answers(f"redis://127.0.0.1:{mport}/0", 30.0, procs[0])
    wait_until_answers(f"redis://127.0.0.1:{sport}/0", 30.0, procs[1])
    store = RedisMemoryStore(f"redis+sentinel://127.0.0.1:{sport}/mymaster", bank="sen", replica_acks=ReplicaAcks(0))
    try:
        exercise(store)
        assert redis.Redis(port=mport).exists(store.ids_key)  # the data went to the master
    finally:
        store.drop_bank()
        store.close()
