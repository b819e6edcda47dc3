"""Service benchmark: /ask latency and throughput under concurrency, /documents throughput.

    .venv/bin/python bench/bench_service.py [--docs 10000] [--seconds 20] [--clients 1 8 32]

Builds (once, cached in bench/.cache) a randomly initialised GPT-2-small-sized LLM (12 layers,
768 wide) and an untrained default checkpoint (k=16, d_m=384, p=16), starts `cmt-serve` in a
subprocess against the Redis at 127.0.0.1:6379, preloads a bank of --docs synthetic memories
straight through the store (compressing 10^4 documents on 2 CPU cores would take ~9 minutes and
measure nothing new), then drives the HTTP API with httpx. Writes bench/results/service.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
DATA = ROOT.parent / "shared" / "data" / "squad" / "test.jsonl.gz"
REDIS = "redis://127.0.0.1:6379/0"


def build_models() -> tuple[Path, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from service.models.checkpoint import save_checkpoint
    from service.models.cmt import CMTModules
    from service.models.config import CMTConfig
    from service.models.llm import HFCausalLM
    from trainer.tokenizer import train_bpe_tokenizer

    llm_dir, ckpt = CACHE / "gpt2-small-random", CACHE / "ckpt"
    if (ckpt / "config.json").is_file():
        return llm_dir, ckpt
    with gzip.open(DATA, "rt") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    tok = train_bpe_tokenizer(texts, vocab_size=8192)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    llm = HFCausalLM(model, tok, str(llm_dir))
    save_checkpoint(ckpt, CMTModules.build(CMTConfig(), llm.layout), llm.identity)
    return llm_dir, ckpt


def preload(bank: str, n: int, compressor_version: str) -> None:
    from service.storage.base import DocumentInput, MemoryWrite
    from service.storage.redis_store import RedisMemoryStore

    store = RedisMemoryStore(REDIS, bank=bank)
    store.drop_bank()
    g = torch.Generator().manual_seed(0)
    for start in range(0, n, 500):
        writes = []
        for i in range(start, min(n, start + 500)):
            key = torch.nn.functional.normalize(torch.randn(384, generator=g), dim=0)
            writes.append(MemoryWrite(DocumentInput(id=f"s{i}", text=f"synthetic document {i}", title=f"doc {i}"),
                                      torch.randn(16, 384, generator=g).half(), key))
        store.put_many(writes, compressor_version)
    store.close()


async def load(url: str, clients: int, seconds: float, body_fn) -> tuple[list[float], list[dict], float]:
    latencies, bodies = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        stop = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            n = 0
            while time.perf_counter() < stop:
                n += 1
                path, payload = body_fn(w, n)
                t = time.perf_counter()
                r = await client.post(path, json=payload)
                latencies.append(time.perf_counter() - t)
                r.raise_for_status()
                bodies.append(r.json())

        start = time.perf_counter()
        await asyncio.gather(*[worker(w) for w in range(clients)])
        return latencies, bodies, time.perf_counter() - start


def raw_compress_rate(ckpt: Path, texts: list[str]) -> float:
    """Θ's own batched forward (batch 32, tokenization included) on the same paragraphs, docs/s."""
    from service.models.compressor import Compressor
    from service.models.config import CMTConfig

    config = CMTConfig.from_dict(json.loads((ckpt / "config.json").read_text())["cmt"])
    compressor = Compressor.from_backbone(config.compressor).eval()
    compressor.compress(texts[:32])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(texts), 32):
        compressor.compress(texts[i : i + 32])
    return len(texts) / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--continuous-batching", choices=["on", "off"], default="on",
                        help="questions join the running decode (on) or each batch decodes to its end (off)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="the LLM's dtype (CMT_DTYPE); auto = bfloat16 on a CPU with native bf16 (AMX/AVX512-BF16)")
    parser.add_argument("--skip-ingest", action="store_true", help="measure /ask only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service.json")
    args = parser.parse_args()

    llm_dir, ckpt = build_models()
    with gzip.open(DATA, "rt") as fh:
        paragraphs = [json.loads(line)["text"] for line in fh]
    raw = raw_compress_rate(ckpt, paragraphs[:256])
    print("raw compressor", raw)
    cv = json.loads((ckpt / "config.json").read_text())["compressor_version"]
    preload("bench", args.docs, cv)
    port = 8791
    env = {**os.environ, "CMT_REDIS_URL": REDIS, "CMT_BANK": "bench", "CMT_LLM": str(llm_dir),
           "CMT_CHECKPOINT": str(ckpt), "CMT_PORT": str(port), "CMT_ASK_BATCH_SIZE": "32",
           "CMT_INGEST_BATCH_SIZE": "32", "CMT_DTYPE": args.dtype,
           "CMT_CONTINUOUS_BATCHING": "true" if args.continuous_batching == "on" else "false"}
    server = subprocess.Popen([sys.executable, "-m", "service.cli"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        from service.runtime.engine import cpu_has_native_bf16, resolve_llm_dtype
        from service.settings import Settings

        llm_dtype = str(resolve_llm_dtype(Settings(dtype=args.dtype))).removeprefix("torch.")
        result: dict = {"docs_in_bank": args.docs, "new_tokens": args.new_tokens,
                        "continuous_batching": args.continuous_batching, "llm_dtype": llm_dtype,
                        "cpu_native_bf16": cpu_has_native_bf16(), "ask": {}}

        def ask(w: int, n: int) -> tuple[str, dict]:
            question = f"What happened to the bridge in report {w}-{n}?"
            return "/ask", {"question": question, "max_new_tokens": args.new_tokens, "top_k": 4}

        for c in args.clients:
            lat, bodies, wall = asyncio.run(load(url, c, args.seconds, ask))
            stages = {s: statistics.median(b["timings_ms"][s] for b in bodies) for s in bodies[0]["timings_ms"]}
            non_gen = statistics.median(b["timings_ms"]["total"] - b["timings_ms"]["generate"] for b in bodies)
            result["ask"][c] = {
                "requests": len(lat), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
                "throughput_rps": len(lat) / wall, "stage_p50_ms": stages,
                # "length" = all --new-tokens decoded; a stop string or EOS ends an answer earlier (less work)
                "finish_reasons": dict(collections.Counter(b["finish_reason"] for b in bodies)),
                "queue_share_p50_pct": 100 * stages["queue"] / stages["total"],
                "non_generate_share_p50_pct":
                    100 * non_gen / statistics.median(b["timings_ms"]["total"] for b in bodies),
                "memory_stages_share_p50_pct": 100 * statistics.median(
                    sum(b["timings_ms"][s] for s in ("encode", "retrieve", "fetch", "aggregate", "align"))
                    / b["timings_ms"]["total"]
                    for b in bodies
                ),
            }
            print(c, json.dumps(result["ask"][c]))

        def docs(w: int, n: int) -> tuple[str, dict]:
            batch = [{"id": f"i{w}-{n}-{j}", "text": paragraphs[(w * 997 + n * 31 + j) % len(paragraphs)]}
                     for j in range(8)]
            return "/documents", {"documents": batch}

        if not args.skip_ingest:
            lat, bodies, wall = asyncio.run(load(url, 4, args.seconds, docs))
            n_docs = sum(len(b["documents"]) for b in bodies)
            result["ingest"] = {"documents": n_docs, "docs_per_s": n_docs / wall, "clients": 4, "docs_per_request": 8,
                                "p50_ms": pct(lat, 50), "raw_compressor_docs_per_s": raw,
                                "share_of_raw_pct": 100 * n_docs / wall / raw}
            print("ingest", json.dumps(result["ingest"]))
        args.out.write_text(json.dumps(result, indent=2))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        from service.storage.redis_store import RedisMemoryStore

        RedisMemoryStore(REDIS, bank="bench").drop_bank()  # leave the shared Redis as we found it


if __name__ == "__main__":
    main()
