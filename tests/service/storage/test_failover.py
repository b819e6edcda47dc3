"""Fail-over against real processes: a 3-master/3-replica Redis Cluster and a Sentinel group on loopback.

A master is SIGKILLed mid-ingest. The store, opened through `open_bank` (acknowledged writes on by
default for cluster and sentinel URLs), must answer 503 for a bounded time, then acknowledge writes
again on the promoted replica without being reopened, and every acknowledged document must still be
readable with its exact memory. Plus: too few replicas → 503 with what to change, write not acknowledged.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.errors import StorageUnavailableError
from service.settings import Settings
from service.storage.embedded import EmbeddedRedis
from service.storage.factory import open_bank
from service.storage.redis_store import RedisMemoryStore
from service.storage.replication import ReplicaAcks

from .failover_scenario import kill_master_mid_ingest, lost_documents
from .helpers import doc, memory_for
from .redis_procs import HAVE_REDIS, LocalCluster, LocalSentinel, Node

pytestmark = pytest.mark.skipif(not HAVE_REDIS, reason="redis-server and redis-cli are needed on PATH")
WINDOW_LIMIT_S = 30.0  # a fail-over that leaves writes refused longer than this is a failure
# Long enough for a replica on a loaded 2-core CI machine to acknowledge a 300-document pipeline (500 ms
# was not, once); a write the dead master never answers fails on the socket, not on this wait.
WAIT_TIMEOUT_MS = 3000


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path / "cluster", node_timeout_ms=2000)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[LocalSentinel]:
    s = LocalSentinel(tmp_path / "sentinel")
    try:
        yield s.start()
    finally:
        s.stop()


def _bank() -> str:
    return "fo-" + uuid.uuid4().hex[:10]


def _assert_survived(report_summary: dict[str, object], lost: list[int], acked: int, window_s: float) -> None:
    print("fail-over:", report_summary)  # noqa: T201 (the figures, with -s)
    assert acked > 60 and lost == [], f"{len(lost)} acknowledged documents lost: {lost[:20]}"
    assert window_s < WINDOW_LIMIT_S


def test_cluster_master_killed_mid_ingest_loses_no_acknowledged_write(cluster: LocalCluster) -> None:
    settings = Settings(redis_url=cluster.url, bank=_bank(), redis_wait_timeout_ms=WAIT_TIMEOUT_MS)
    store = open_bank(settings)
    assert isinstance(store, RedisMemoryStore) and type(store._r).__name__ == "RedisCluster"
    assert store._writer.acks.replicas == 1  # on by default for redis+cluster://
    try:
        owner = cluster.owner_of(store.ids_key)
        waits = owner.use(lambda r: r.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
        store.max_batch = 128  # 300 documents = 3 script calls in one pipeline, and a single WAIT
        res = store.put_many([(doc(10_000 + i), *memory_for(i)) for i in range(300)], "v1")
        assert [r.status for r in res] == ["new"] * 300
        assert owner.use(lambda r: r.info("commandstats")["cmdstat_wait"]["calls"]) == waits + 1
        # a stale slot table (a move this client has not seen yet): MOVED, the table is read again, sent again
        rc = store._r
        rc.nodes_manager.slots_cache[rc.keyslot(store.ids_key)] = [
            next(n for n in rc.get_primaries() if n.port != owner.port)]
        assert store.put_many([(doc(20_000), *memory_for(0))], "v1")[0].status == "new"
        assert rc.get_node_from_key(store.ids_key).port == owner.port

        def kill() -> Node:
            victim = cluster.owner_of(store.ids_key)  # the master that serves the bank's slot
            victim.kill()
            return victim

        report = kill_master_mid_ingest(
            store, kill, lambda old: cluster.wait_promoted(store.ids_key, old),
            lambda old, new: old.start(),  # comes back empty, learns the newer epoch, re-syncs as a replica
        )
        assert cluster.owner_of(store.ids_key).port != owner.port  # the same store now writes elsewhere
        assert report.failed > 0 and report.first_error_after_kill_s is not None  # the kill was felt
        _assert_survived(report.summary(), report.lost, report.acked, report.window_s)
        assert store.delete("doc-0") and store.get("doc-0") is None  # deletes wait on the new master too
    finally:
        store.close()


def test_sentinel_master_killed_mid_ingest_loses_no_acknowledged_write(sentinel: LocalSentinel) -> None:
    store = open_bank(Settings(redis_url=sentinel.url, bank=_bank(), redis_wait_timeout_ms=WAIT_TIMEOUT_MS))
    assert isinstance(store, RedisMemoryStore) and store._writer.acks.replicas == 1  # on by default for sentinel
    try:
        def kill() -> Node:
            victim = sentinel.master()
            victim.kill()
            return victim

        def restart(old: Node, new: Node) -> None:  # back as a replica of whoever the sentinels promoted
            old.start(["--replicaof", "127.0.0.1", str(new.port)])

        first = sentinel.master()
        report = kill_master_mid_ingest(store, kill, sentinel.wait_promoted, restart)
        assert sentinel.master().port != first.port
        assert report.failed > 0 and report.first_error_after_kill_s is not None
        _assert_survived(report.summary(), report.lost, report.acked, report.window_s)
    finally:
        store.close()


def test_too_few_replicas_is_a_503_that_says_what_to_change(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", appendfsync="no").start()  # a master without replicas
    store = RedisMemoryStore(server.url, bank=_bank(), replica_acks=ReplicaAcks(1, timeout_ms=100))
    try:
        with pytest.raises(StorageUnavailableError) as info:
            store.put_many([(doc(1), *memory_for(1))], "v1")
        err = info.value
        assert err.http_status == 503 and err.code == "storage_unavailable"
        assert "0 of 1 replica(s)" in err.message and "CMT_REDIS_WAIT_REPLICAS" in err.message
        assert err.details["acknowledged"] == 0 and err.details["required"] == 1
        # it reached the master, but the caller was told it is not acknowledged; a retry is refused alike
        with pytest.raises(StorageUnavailableError, match="not acknowledged"):
            store.put_many([(doc(1), *memory_for(1))], "v1")
        with pytest.raises(StorageUnavailableError, match="replica"):
            store.delete("doc-1")
    finally:
        store.close()
        server.stop()


def test_a_cluster_url_waits_for_a_replica_by_default(tmp_path: Path) -> None:
    """A one-node cluster (no replica) through the factory's defaults: writes are refused, not silently
    unreplicated; with CMT_REDIS_WAIT_REPLICAS=0 the same cluster accepts them."""
    c = LocalCluster(tmp_path / "one", masters=1, replicas=0)
    try:
        c.start()
        with pytest.raises(StorageUnavailableError, match="CMT_REDIS_WAIT_REPLICAS") as info:
            with open_bank(Settings(redis_url=c.url, bank=_bank(), redis_wait_timeout_ms=100)) as store:
                store.put_many([(doc(1), *memory_for(1))], "v1")
        assert info.value.details["cause"] == "replicas_not_acknowledged"
        with open_bank(Settings(redis_url=c.url, bank=_bank(), redis_wait_replicas=0)) as store:
            assert store.put_many([(doc(1), *memory_for(1))], "v1")[0].status == "new"
    finally:
        c.stop()


@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_a_stalled_replica_loses_acknowledged_writes_only_without_wait(
    sentinel: LocalSentinel, wait_replicas: int
) -> None:
    """The replica stops reading (SIGSTOP) while ~38 MB are written, more than loopback socket buffers
    hold, then the master dies and that replica is promoted. Without WAIT the writes were acknowledged
    and are gone (this is what the check must catch); with WAIT each call was a 503 and nothing is lost."""
    store = open_bank(Settings(redis_url=sentinel.url, bank=_bank(), redis_wait_replicas=wait_replicas,
                               redis_wait_timeout_ms=100))
    master, replica = sentinel.master(), next(n for n in sentinel.servers if n is not sentinel.master())
    acked: list[int] = []
    refused: list[StorageUnavailableError] = []
    try:
        store.put_many([(doc(n), *memory_for(n)) for n in range(10)], "v1")
        acked += range(10)
        replica.pause(True)
        for start in range(10, 3010, 100):
            try:
                store.put_many([(doc(n), *memory_for(n)) for n in range(start, start + 100)], "v1")
                acked += range(start, start + 100)
            except StorageUnavailableError as exc:
                refused.append(exc)
        master.kill()
        replica.pause(False)
        assert sentinel.wait_promoted(master) is replica
        lost = lost_documents(store, acked)
        print(f"stalled replica, WAIT {wait_replicas}: acked {len(acked)}, refused calls {len(refused)}, "  # noqa: T201
              f"lost {len(lost)}")
        if wait_replicas:
            assert len(refused) == 30 and acked == list(range(10)) and lost == []
            assert all(e.details["cause"] == "replicas_not_acknowledged" for e in refused)
        else:
            assert not refused and len(lost) > 0  # acknowledged, then lost: the failure WAIT prevents
    finally:
        store.close()
