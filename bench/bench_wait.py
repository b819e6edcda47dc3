"""What acknowledged writes (Redis WAIT) cost and what they buy, on a 3-master/3-replica loopback cluster.

1. Throughput: documents/s of `put_many` with WAIT off (0 replicas) and on (1), at a few batch sizes,
   rounds interleaved so background load hits both alike.
2. Kill a master mid-ingest (SIGKILL, replica promoted, old node restarted as a replica), `--kill-runs`
   times per setting, on a fresh cluster each time: acknowledged documents lost, the 503 window.
3. A stalled replica (SIGSTOP while `--stall-docs` documents are written, more than loopback socket
   buffers hold), then the master is killed: acknowledged documents lost with WAIT off and on.

    python bench/bench_wait.py                      # ~2-3 minutes on 2 cores
    python bench/bench_wait.py --docs 1000 --kill-runs 1

Writes bench/results/wait.json and prints a summary. Needs redis-server and redis-cli on PATH.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on the 2 cores

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.errors import StorageUnavailableError  # noqa: E402 (after the sys.path line)
from service.storage.redis_store import RedisMemoryStore  # noqa: E402 (after the sys.path line)
from service.storage.replication import ReplicaAcks  # noqa: E402 (after the sys.path line)
from tests.service.storage.failover_scenario import kill_master_mid_ingest, lost_documents  # noqa: E402
from tests.service.storage.helpers import doc, memory_for  # noqa: E402 (after the sys.path line)
from tests.service.storage.redis_procs import HAVE_REDIS, LocalCluster, Node  # noqa: E402


def _store(cluster: LocalCluster, replicas: int, timeout_ms: int) -> RedisMemoryStore:
    bank = "bench-" + uuid.uuid4().hex[:8]
    return RedisMemoryStore(cluster.url, bank=bank, replica_acks=ReplicaAcks(replicas, timeout_ms))


def bench_throughput(cluster: LocalCluster, docs: int, batches: list[int], rounds: int, timeout_ms: int) -> list[dict]:
    items = [(doc(n), *memory_for(n)) for n in range(docs)]  # made once: only the writes are timed
    out = []
    for batch in batches:
        rates: dict[int, list[float]] = {0: [], 1: []}
        lat: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(rounds):
            for replicas in (0, 1):
                store = _store(cluster, replicas, timeout_ms)
                t0 = time.perf_counter()
                for s in range(0, docs, batch):
                    t1 = time.perf_counter()
                    store.put_many(items[s : s + batch], "v1")
                    lat[replicas].append(time.perf_counter() - t1)
                rates[replicas].append(docs / (time.perf_counter() - t0))
                store.drop_bank()
                store.close()
        row: dict[str, Any] = {"batch": batch}
        for replicas, name in ((0, "off"), (1, "on")):
            ms = sorted(x * 1e3 for x in lat[replicas])
            row[f"wait_{name}_docs_per_s"] = round(statistics.median(rates[replicas]), 1)
            row[f"wait_{name}_call_p50_ms"] = round(ms[len(ms) // 2], 3)
            row[f"wait_{name}_call_p99_ms"] = round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3)
        row["on_over_off"] = round(row["wait_on_docs_per_s"] / row["wait_off_docs_per_s"], 3)
        out.append(row)
        print(f"  batch {batch}: off {row['wait_off_docs_per_s']:.0f} docs/s, on {row['wait_on_docs_per_s']:.0f} "
              f"docs/s ({row['on_over_off']:.2f}x)", flush=True)
    return out


def kill_run(root: Path, replicas: int, timeout_ms: int, node_timeout_ms: int) -> dict:
    cluster = LocalCluster(root, node_timeout_ms=node_timeout_ms).start()
    store = _store(cluster, replicas, timeout_ms)
    try:
        def kill() -> Node:
            victim = cluster.owner_of(store.ids_key)
            victim.kill()
            return victim

        report = kill_master_mid_ingest(store, kill, lambda old: cluster.wait_promoted(store.ids_key, old),
                                        lambda old, new: old.start(), before=200, after=100)
        s = report.summary()
        s["lost"] = len(report.lost)
        return s
    finally:
        store.close()
        cluster.stop()


def stalled_run(root: Path, replicas: int, docs: int, timeout_ms: int, node_timeout_ms: int) -> dict:
    cluster = LocalCluster(root, node_timeout_ms=node_timeout_ms).start()
    store = _store(cluster, replicas, timeout_ms)
    try:
        master = cluster.owner_of(store.ids_key)
        replica = cluster.replica_of(master)
        acked: list[int] = []
        refused = 0
        replica.pause(True)
        for s in range(0, docs, 100):
            try:
                store.put_many([(doc(n), *memory_for(n)) for n in range(s, min(docs, s + 100))], "v1")
                acked += range(s, min(docs, s + 100))
            except StorageUnavailableError:
                refused += 1
        master.kill()
        replica.pause(False)
        cluster.wait_promoted(store.ids_key, master)
        t0 = time.monotonic()
        while True:  # the store finds the new master by itself; a read may 503 until it has
            try:
                lost = lost_documents(store, acked)
                break
            except StorageUnavailableError:
                if time.monotonic() - t0 > 30:
                    raise
                time.sleep(0.05)
        return {"written": docs, "acked": len(acked), "refused_calls": refused, "lost": len(lost)}
    finally:
        store.close()
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=2000, help="documents written per throughput measurement")
    p.add_argument("--batches", default="1,32", help="documents per put_many call (comma separated)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved off/on rounds per batch size (median kept)")
    p.add_argument("--timeout-ms", type=int, default=1000, help="WAIT timeout")
    p.add_argument("--node-timeout-ms", type=int, default=2000, help="cluster-node-timeout (fail-over speed)")
    p.add_argument("--kill-runs", type=int, default=3, help="kill-a-master runs per setting")
    p.add_argument("--stall-docs", type=int, default=3000,
                   help="documents written while the replica is stopped (WAIT timeout 100 ms there)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "wait.json"))
    args = p.parse_args(argv)
    if not HAVE_REDIS:
        print("redis-server and redis-cli are needed on PATH", file=sys.stderr)
        return 2
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                           "args": vars(args), "doc": {"k": 16, "d_m": 384, "memory_bytes_fp16": 16 * 384 * 2}}
    with tempfile.TemporaryDirectory(prefix="cmt-bench-wait-") as tmp:
        root = Path(tmp)
        print("throughput (3+3 loopback cluster):", flush=True)
        cluster = LocalCluster(root / "throughput", node_timeout_ms=args.node_timeout_ms).start()
        try:
            batches = [int(b) for b in args.batches.split(",") if b]
            out["throughput"] = bench_throughput(cluster, args.docs, batches, args.rounds, args.timeout_ms)
        finally:
            cluster.stop()
        out["kill_master"] = {}
        for replicas, name in ((0, "wait_off"), (1, "wait_on")):
            runs = [kill_run(root / f"kill-{name}-{i}", replicas, args.timeout_ms, args.node_timeout_ms)
                    for i in range(args.kill_runs)]
            out["kill_master"][name] = {"runs": runs, "lost_total": sum(r["lost"] for r in runs),
                                        "acked_total": sum(r["acked"] for r in runs)}
            print(f"  kill a master, {name}: lost {[r['lost'] for r in runs]} of acked {[r['acked'] for r in runs]}; "
                  f"503 window {[r['window_s'] for r in runs]} s, recovered after "
                  f"{[r['recovered_after_s'] for r in runs]} s", flush=True)
        out["stalled_replica"] = {}
        for replicas, name in ((0, "wait_off"), (1, "wait_on")):
            r = stalled_run(root / f"stall-{name}", replicas, args.stall_docs, 100, args.node_timeout_ms)
            out["stalled_replica"][name] = r
            print(f"  stalled replica, {name}: {r}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
