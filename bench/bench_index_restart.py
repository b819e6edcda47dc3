"""Index restart benchmark: full rebuild from Redis vs restart from the index snapshot.

Fills a bank of N documents (keys of the real width 384, the smallest memory the store takes: one
token) on its own redis-server (temporary folder, no persistence, so the shared Redis is untouched),
then measures:

* the full rebuild (scan + HNSW build), what every start cost before snapshots;
* the snapshot: capture time and, of it, time the index lock is held; write time (hash + write +
  fsync, off the lock); size;
* the restart from it: load (read + checksum + state + graph) and replay of the events written
  after the snapshot (default 1,000: new, replaced and deleted documents), till ready to serve;
* recall@10 of the restored index and of the rebuilt one against exact search (same queries).

    python bench/bench_index_restart.py --docs 100000
    nice -n 10 python bench/bench_index_restart.py              # 10^6 (the issue's target: ready within 60 s)

Adds (or replaces) the run for N in bench/results/index-restart.json and prints it. The snapshot
is read back from the page cache (it was just written): a cold disk adds its read time (size / MB/s).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_storage.py: idle OpenMP threads spin otherwise

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.storage.base import DocumentInput  # noqa: E402 (after the sys.path line)
from service.storage.embedded import EmbeddedRedis  # noqa: E402 (after the sys.path line)
from service.storage.index import VectorIndex  # noqa: E402 (after the sys.path line)
from service.storage.index_restore import IndexSnapshots  # noqa: E402 (after the sys.path line)
from service.storage.redis_store import RedisMemoryStore  # noqa: E402 (after the sys.path line)
from service.storage.sync import SyncedIndex  # noqa: E402 (after the sys.path line)

D = 384


def clustered(n: int, seed: int, n_clusters: int = 1000, latent: int = 32) -> np.ndarray:
    """Low-intrinsic-dimension keys like sentence embeddings (as bench_storage.py): (n, D) float32, unit norm."""
    rng = np.random.default_rng(seed)
    a = np.random.default_rng(12345).standard_normal((latent, D)).astype(np.float32)  # (latent, D)
    c = np.random.default_rng(54321).standard_normal((n_clusters, latent)).astype(np.float32)  # (C, latent)
    out = np.empty((n, D), np.float32)  # (n, D)
    for s in range(0, n, 100_000):
        m = min(n, s + 100_000) - s
        z = c[rng.integers(0, n_clusters, m)] + 0.3 * rng.standard_normal((m, latent), dtype=np.float32)
        x = z @ a + 0.5 * rng.standard_normal((m, D), dtype=np.float32)  # (m, D)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def fill(store: RedisMemoryStore, n: int, batch: int) -> float:
    """N documents with one-token memories and fp16 keys (as the service stores them); seconds taken."""
    memory = torch.zeros(1, D, dtype=torch.float16)  # (1, D): the smallest memory the store takes
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        keys = torch.from_numpy(clustered(min(batch, n - s), seed=s)).half()  # (b, D)
        store.put_many([(DocumentInput(f"d{s + j}", "t"), memory, keys[j]) for j in range(len(keys))], "v1")
        if s // batch % 20 == 0:
            print(f"  filled {s + len(keys)}/{n}  {time.perf_counter() - t0:.0f} s", flush=True)
    return time.perf_counter() - t0


def write_after_snapshot(store: RedisMemoryStore, n: int, events: int) -> None:
    """`events` writes by another replica while this one restarts: 80% new, 10% replaced, 10% deleted."""
    memory = torch.zeros(1, D, dtype=torch.float16)
    n_new, n_rep = events * 8 // 10, events // 10
    new = torch.from_numpy(clustered(n_new + n_rep, seed=10**9)).half()  # (n_new + n_rep, D)
    store.put_many([(DocumentInput(f"new{j}", "t"), memory, new[j]) for j in range(n_new)], "v1")
    store.put_many([(DocumentInput(f"d{j * 7}", f"edited {j}"), memory, new[n_new + j]) for j in range(n_rep)], "v1")
    store.delete_many([f"d{j * 7 + 3}" for j in range(events - n_new - n_rep)])


def recall(idx: SyncedIndex, queries: np.ndarray, truth: list[set[str]]) -> tuple[float, list[list[str]]]:
    got = [[h.id for h in idx.search(q, 10)] for q in queries]
    return float(np.mean([len(set(g) & t) / 10 for g, t in zip(got, truth, strict=True)])), got


def run(store: RedisMemoryStore, other: RedisMemoryStore, folder: Path, args: argparse.Namespace) -> dict:
    res: dict = {"docs": args.docs}
    res["fill_s"] = fill(other, args.docs, args.batch)
    print(f"  rebuild (scan + HNSW) of {args.docs} ...", flush=True)
    t0 = time.perf_counter()
    rebuilt = SyncedIndex(store, VectorIndex(ef_construction=args.ef_construction), batch_size=2000).start(
        follow=False)
    res["rebuild_s"] = time.perf_counter() - t0
    res["rebuilt_hnsw"] = rebuilt.is_approximate
    snaps = IndexSnapshots(folder, interval_s=0)
    t0 = time.perf_counter()
    rebuilt.index.capture()  # what the writer does first: pre-fault a buffer, copy under the lock, convert
    res["snapshot_capture_s"] = time.perf_counter() - t0
    res["snapshot_lock_s"] = rebuilt.index.capture_lock_s  # of which the index lock was held
    info = snaps.save(rebuilt, force=True)
    assert info is not None
    res.update(snapshot_write_s=info.write_s, snapshot_bytes=info.bytes)
    print(f"  rebuild {res['rebuild_s']:.1f} s; snapshot {info.bytes / 1e6:.0f} MB in {info.write_s:.1f} s", flush=True)
    write_after_snapshot(other, args.docs, args.events)
    rebuilt.catch_up()  # the rebuilt index follows those writes too: both now hold the same documents
    t0 = time.perf_counter()
    restored_store = RedisMemoryStore(store.url, bank=store.bank)
    restored = SyncedIndex(restored_store, VectorIndex(ef_construction=args.ef_construction), batch_size=2000,
                           snapshots=IndexSnapshots(folder, interval_s=0)).start(follow=False)
    res["restart_s"] = time.perf_counter() - t0
    r = restored.snapshots.last_restore if restored.snapshots is not None else None
    res.update(restored=r is not None and restored.rebuilds == 0, documents=len(restored),
               restart_load_s=None if r is None else r.load_s, restart_replay_s=None if r is None else r.replay_s,
               events_replayed=None if r is None else r.replayed)
    queries = clustered(args.queries, seed=7 * 10**9)  # (Q, D)
    truth = [{h.id for h in rebuilt.search(q, 10, approximate=False)} for q in queries]
    res["recall_at_10_rebuilt"], got_rebuilt = recall(rebuilt, queries, truth)
    res["recall_at_10_restored"], got_restored = recall(restored, queries, truth)
    res["top10_identical_fraction"] = float(np.mean([a == b for a, b in zip(got_rebuilt, got_restored, strict=True)]))
    res["speedup"] = res["rebuild_s"] / res["restart_s"]
    restored.close()
    restored_store.close()
    rebuilt.close()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=1000, help="writes made after the snapshot, replayed at restart")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--batch", type=int, default=10_000, help="documents per put_many while filling")
    p.add_argument("--ef-construction", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "index-restart.json"))
    args = p.parse_args(argv)
    with (tempfile.TemporaryDirectory(prefix="cmt-bench-restart-") as tmp,
          EmbeddedRedis(Path(tmp) / "redis", appendfsync="no", extra_args=["--appendonly", "no"]) as srv,
          RedisMemoryStore(srv.url, bank="bench-restart", max_batch=2000) as store,
          RedisMemoryStore(srv.url, bank="bench-restart", max_batch=2000) as other):
        res = run(store, other, Path(tmp) / "index", args)
        with redis.Redis.from_url(srv.url) as r:
            res["redis_used_memory_bytes"] = int(r.info("memory")["used_memory"])
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                      "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    res["args"] = vars(args)
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    runs = sorted([r for r in runs if r["docs"] != args.docs] + [res], key=lambda r: r["docs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
