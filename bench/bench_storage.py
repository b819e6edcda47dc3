"""Memory-bank benchmark: bytes per document, ingest throughput, index rebuild, top-k latency.

Runs its own redis-server (AOF, appendfsync as the embedded default: always) in a temporary dir,
so the shared Redis is untouched and the figures include durability cost.

    python bench/bench_storage.py                                  # sizes 1e4,1e5
    python bench/bench_storage.py --sizes 10000,100000,1000000     # adds 1e6 (a few minutes)

Writes bench/results/storage.json and prints a table.
"""

from __future__ import annotations

import os

# Before torch/faiss/numpy start their OpenMP pools: with the default (active) wait policy, idle
# OpenMP threads of one library spin and steal the 2 cores from the next (exact top-k p99 at 1e4
# goes from ~1 ms to ~12-15 ms). Override with OMP_WAIT_POLICY=ACTIVE to see that effect.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import redis
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.storage.base import DocumentInput, IndexEntry, SearchFilters  # noqa: E402 (after the sys.path line)
from service.storage.embedded import EmbeddedRedis  # noqa: E402 (after the sys.path line)
from service.storage.index import VectorIndex  # noqa: E402 (after the sys.path line)
from service.storage.redis_store import RedisMemoryStore  # noqa: E402 (after the sys.path line)
from service.storage.sync import SyncedIndex  # noqa: E402 (after the sys.path line)

K, D = 16, 384
T0 = datetime(2024, 1, 1, tzinfo=UTC)
LLAMA2_7B_KV_PER_TOKEN = 32 * 2 * 4096 * 2  # layers × (K,V) × hidden × fp16 bytes


def clustered(n: int, rng: np.random.Generator, n_clusters: int = 1000, latent: int = 32) -> np.ndarray:
    """Low-intrinsic-dimension keys (closer to real sentence embeddings): (n, D) float32, unit norm."""
    a = np.random.default_rng(12345).standard_normal((latent, D)).astype(np.float32)  # (latent, D) fixed basis
    c = np.random.default_rng(54321).standard_normal((n_clusters, latent)).astype(np.float32)  # (C, latent)
    out = np.empty((n, D), np.float32)  # (n, D)
    for s in range(0, n, 100_000):
        m = min(n, s + 100_000) - s
        z = c[rng.integers(0, n_clusters, m)] + 0.3 * rng.standard_normal((m, latent), dtype=np.float32)  # (m, latent)
        x = z @ a + 0.5 * rng.standard_normal((m, D), dtype=np.float32)  # (m, D)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def gaussian(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, D), dtype=np.float32)  # (n, D)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, p))


def text_of(i: int, n_chars: int) -> str:
    base = f"Document {i}: on day {i % 365} the committee reported figures for region {i % 97}. "
    return (base * (n_chars // len(base) + 1))[:n_chars]


def docs_batch(
    start: int, n: int, keys: np.ndarray, n_chars: int
) -> list[tuple[DocumentInput, torch.Tensor, torch.Tensor]]:
    mem = torch.randn(n, K, D).to(torch.float16)  # (n, K, D)
    return [
        (DocumentInput(f"doc-{i}", text_of(i, n_chars), title=f"Title of document {i}", source=f"source-{i % 20}",
                       published_at=T0 + timedelta(minutes=i)),
         mem[j], torch.from_numpy(keys[i]).half())  # fp16 key, as the service stores it
        for j, i in enumerate(range(start, start + n))
    ]


def bench_bytes(store: RedisMemoryStore, n: int = 500, n_chars: int = 3000) -> dict:
    keys = clustered(n, np.random.default_rng(1))
    store.put_many(docs_batch(0, n, keys, n_chars), "ckpt-v1")
    mem_b, meta_b = [], []
    for i in range(0, n, 5):
        doc_u, mem_u = store.memory_usage(f"doc-{i}")
        mem_b.append(mem_u)
        meta_b.append(doc_u - n_chars)  # the hash minus the text bytes it holds
    with redis.Redis.from_url(store.url) as r:  # the id set's own footprint, read as an operator would
        ids_b = int(r.memory_usage(store.ids_key, samples=0)) / n
    theo = K * D * 2
    mem_avg, meta_avg = float(np.mean(mem_b)), float(np.mean(meta_b))
    per_doc = mem_avg + meta_avg + ids_b
    kv_500 = 500 * LLAMA2_7B_KV_PER_TOKEN
    return {
        "k": K, "d_m": D, "theoretical_bytes": theo, "memory_value_bytes": mem_avg,
        "memory_value_vs_theoretical": mem_avg / theo, "metadata_bytes_excl_text": meta_avg,
        "ids_zset_bytes_per_doc": ids_b, "total_excl_text": per_doc, "total_vs_theoretical": per_doc / theo,
        "llama2_7b_kv_cache_500_tokens": kv_500, "kv_cache_over_cmt": kv_500 / per_doc,
    }


def bench_ingest_rebuild(store: RedisMemoryStore, n: int, batch: int, n_chars: int) -> dict:
    keys = clustered(n, np.random.default_rng(2))  # (n, D)
    t_write = 0.0
    for s in range(0, n, batch):
        items = docs_batch(s, min(batch, n - s), keys, n_chars)
        t0 = time.perf_counter()
        store.put_many(items, "ckpt-v1")
        t_write += time.perf_counter() - t0
    t0 = time.perf_counter()
    entries = sum(len(b) for b in store.iter_index_entries(2000))
    t_scan = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx = SyncedIndex(store, VectorIndex(approx_threshold=50_000), batch_size=2000).start(follow=False)
    t_rebuild = time.perf_counter() - t0
    approx = idx.index.is_approximate
    idx.close()
    # read path: one MGET of 8 memories (what /ask fetches), to judge whether an LRU cache is worth it
    rng = np.random.default_rng(3)
    lat = []
    for _ in range(300):
        ids = [f"doc-{i}" for i in rng.integers(0, n, 8)]
        t0 = time.perf_counter()
        store.get_memories(ids)
        lat.append(time.perf_counter() - t0)
    return {
        "docs": n, "batch": batch, "text_chars": n_chars, "write_s": t_write, "docs_per_s": n / t_write,
        "scan_entries": entries, "scan_s": t_scan, "rebuild_s_incl_hnsw": t_rebuild, "rebuild_built_hnsw": approx,
        "rebuild_s_extrapolated_1e6": t_rebuild * (1e6 / n) * 1.2,  # HNSW build is ~n log n
        "get_memories_8_p50_ms": pct(lat, 50), "get_memories_8_p99_ms": pct(lat, 99),
    }


def bench_topk(n: int, kind: str, n_queries: int, efs: list[int]) -> dict:
    rng = np.random.default_rng(4)
    gen = clustered if kind == "clustered" else gaussian
    data = gen(n + n_queries, rng)  # (n + Q, D)
    bank, queries = data[:n], data[n:]  # (n, D), (Q, D)
    idx = VectorIndex(approx_threshold=10**12, auto_maintain=False)
    chunk = 100_000
    for s in range(0, n, chunk):
        idx.upsert([IndexEntry(f"d{i}", bank[i], "v1", f"s{i % 10}", None, T0) for i in range(s, min(n, s + chunk))])
    res: dict = {"n": n, "keys": kind}
    lat, truth = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = idx.search(q, 10, approximate=False)
        lat.append(time.perf_counter() - t0)
        truth.append({h.id for h in hits})
    res.update(exact_p50_ms=pct(lat, 50), exact_p99_ms=pct(lat, 99))
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        idx.search(q, 10, SearchFilters(source=("s3",)), approximate=False)
        lat.append(time.perf_counter() - t0)
    res.update(exact_filtered10pct_p99_ms=pct(lat, 99))
    idx.approx_threshold = 1
    t0 = time.perf_counter()
    idx.maintain(wait=True)
    res["hnsw_build_s"] = time.perf_counter() - t0
    res["approx"] = []
    for ef in efs:
        idx.ef_search = ef
        lat, rec = [], []
        for q, t in zip(queries, truth, strict=True):
            t0 = time.perf_counter()
            hits = idx.search(q, 10)
            lat.append(time.perf_counter() - t0)
            rec.append(len({h.id for h in hits} & t) / 10)
        flat = []
        for q in queries:
            t0 = time.perf_counter()
            idx.search(q, 10, SearchFilters(source=("s3",)))
            flat.append(time.perf_counter() - t0)
        res["approx"].append({"ef_search": ef, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                              "recall_at_10": float(np.mean(rec)), "filtered10pct_p99_ms": pct(flat, 99)})
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="top-k index sizes (comma separated)")
    p.add_argument("--gaussian-max", type=int, default=100_000,
                   help="largest size for Gaussian keys (HNSW build on them is ~6x slower)")
    p.add_argument("--ingest-docs", type=int, default=100_000)
    p.add_argument("--ingest-batch", type=int, default=64)
    p.add_argument("--text-chars", type=int, default=1000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--ef", default="64,128,256")
    p.add_argument("--appendfsync", default="always", choices=["always", "everysec", "no"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "storage.json"))
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    efs = [int(e) for e in args.ef.split(",") if e]
    torch.manual_seed(0)
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
                 "args": vars(args)}
    with (tempfile.TemporaryDirectory(prefix="cmt-bench-") as tmp,
          EmbeddedRedis(tmp, appendfsync=args.appendfsync) as srv):
        with RedisMemoryStore(srv.url, bank="bench-bytes") as store:
            out["bytes"] = bench_bytes(store)
            store.drop_bank()
        if args.ingest_docs:
            with RedisMemoryStore(srv.url, bank="bench-ingest") as store:
                out["ingest"] = bench_ingest_rebuild(store, args.ingest_docs, args.ingest_batch, args.text_chars)
    out["topk"] = []
    for n in sizes:
        for kind in ("clustered", "gaussian"):
            if kind == "gaussian" and n > args.gaussian_max:
                continue
            r = bench_topk(n, kind, args.queries, efs)
            out["topk"].append(r)
            print(f"  topk n={n} {kind}: exact p99 {r['exact_p99_ms']:.2f} ms, hnsw build {r['hnsw_build_s']:.1f} s, "
                  + ", ".join(f"ef{a['ef_search']} p99 {a['p99_ms']:.2f} ms R@10 {a['recall_at_10']:.3f}"
                              for a in r["approx"]),
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print_table(out)
    return 0


def print_table(out: dict) -> None:
    b = out["bytes"]
    print("\n== bytes per document (k=16, d_m=384) ==")
    print(f"memory value {b['memory_value_bytes']:.0f} B vs theoretical {b['theoretical_bytes']} B "
          f"= {b['memory_value_vs_theoretical']:.3f}x; metadata excl. text {b['metadata_bytes_excl_text']:.0f} B; "
          f"ids zset {b['ids_zset_bytes_per_doc']:.0f} B; total excl. text {b['total_excl_text']:.0f} B "
          f"= {b['total_vs_theoretical']:.3f}x")
    print(f"Llama-2-7B KV cache of 500 tokens: {b['llama2_7b_kv_cache_500_tokens'] / 2**20:.0f} MiB "
          f"= {b['kv_cache_over_cmt']:.0f}x the CMT document")
    if "ingest" in out:
        g = out["ingest"]
        print(f"\n== ingest / rebuild at {g['docs']} docs ==")
        print(f"write {g['docs_per_s']:.0f} docs/s (batch {g['batch']}, appendfsync {out['args']['appendfsync']}); "
              f"scan {g['scan_s']:.1f} s; rebuild incl. HNSW {g['rebuild_s_incl_hnsw']:.1f} s "
              f"(~{g['rebuild_s_extrapolated_1e6']:.0f} s at 1e6); "
              f"get_memories(8) p50 {g['get_memories_8_p50_ms']:.2f} ms "
              f"p99 {g['get_memories_8_p99_ms']:.2f} ms")
    print("\n== top-10 latency (ms) ==")
    print(f"{'n':>8} {'keys':>9} {'exact p50':>9} {'exact p99':>9} {'build s':>7} {'ef':>4} {'ann p50':>7} "
          f"{'ann p99':>7} {'R@10':>6} {'filt p99':>8}")
    for r in out["topk"]:
        for a in r["approx"]:
            print(f"{r['n']:>8} {r['keys']:>9} {r['exact_p50_ms']:>9.2f} {r['exact_p99_ms']:>9.2f} "
                  f"{r['hnsw_build_s']:>7.1f} {a['ef_search']:>4} {a['p50_ms']:>7.2f} {a['p99_ms']:>7.2f} "
                  f"{a['recall_at_10']:>6.3f} {a['filtered10pct_p99_ms']:>8.2f}")


if __name__ == "__main__":
    sys.exit(main())
