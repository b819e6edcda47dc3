"""Soak benchmark: the server's memory (RSS) under a steady load of questions.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 5 .venv/bin/python bench/bench_soak.py \
        [--docs 300] [--warmup 60] [--duration 600] [--clients 4] [--stream-share 0.25]

Starts the real `cmt-serve` (`python -m service.cli`: SmolLM2-135M + the shipped checkpoint, embedded Redis)
in a subprocess on a free port with its own temporary data folder and the same OMP_* settings as this process
(OMP_NUM_THREADS=1: one torch thread), ingests --docs real SQuAD test paragraphs through POST /documents, asks
their real questions for --warmup seconds, then runs --clients concurrent question clients (POST /ask, a share
of them streaming) for --duration seconds. Every --interval seconds it samples the RSS of the server process
(children not included) and, separately, of its embedded redis-server. Reports RSS at the end of the warm-up
and at the end, the growth, the least-squares slope over the measurement window (MiB/min; also per half of the
window, to tell an allocator settling from a leak), the max, requests, errors and p50 latency.
Writes bench/results/soak.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import DATA, ROOT, pct  # noqa: E402

MIB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_docs(n: int) -> list[dict]:
    with gzip.open(DATA, "rt") as fh:
        docs = [json.loads(line) for _, line in zip(range(n), fh, strict=False)]
    return docs


def start_server(data_dir: Path, port: int, extra_env: list[str]) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "CMT_PORT": str(port), "CMT_HOST": "127.0.0.1", "CMT_DATA_DIR": str(data_dir / "redis"),
           "CMT_INDEX_SNAPSHOT_DIR": str(data_dir / "index"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    env.pop("CMT_REDIS_URL", None)  # embedded Redis
    for kv in extra_env:
        key, _, value = kv.partition("=")
        env[key] = value
    log = data_dir / "server.log"
    with open(log, "wb") as fh:
        server = subprocess.Popen([sys.executable, "-m", "service.cli"], cwd=ROOT, env=env, stdout=fh, stderr=fh)
    return server, log


def wait_ready(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout_s} s:\n{log.read_text()[-4000:]}")


def ingest(url: str, docs: list[dict], batch: int = 16) -> float:
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(0, len(docs), batch):
            payload = [{"id": d["doc_id"], "text": d["text"], "title": d["title"], "source": "squad"}
                       for d in docs[i : i + batch]]
            client.post("/documents", json={"documents": payload}).raise_for_status()
    return time.perf_counter() - start


def redis_pid(data_dir: Path) -> int | None:
    try:
        return int(json.loads((data_dir / "redis" / "server.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


class Sampler:
    """RSS of the server (and of its embedded Redis) every `interval` seconds, tagged with the phase."""

    def __init__(self, server_pid: int, redis: int | None, interval: float) -> None:
        self.server = psutil.Process(server_pid)
        self.redis = psutil.Process(redis) if redis else None
        self.interval, self.phase, self.samples, self.t0 = interval, "warmup", [], time.monotonic()

    def sample(self) -> dict:
        info = self.server.memory_full_info()
        row = {"t_s": round(time.monotonic() - self.t0, 2), "phase": self.phase, "rss_mib": info.rss / MIB,
               "uss_mib": info.uss / MIB, "threads": self.server.num_threads(), "fds": self.server.num_fds()}
        if self.redis is not None and self.redis.is_running():
            row["redis_rss_mib"] = self.redis.memory_info().rss / MIB
        self.samples.append(row)
        return row

    async def run(self) -> None:
        while True:
            row = self.sample()
            print(f"  t={row['t_s']:7.1f}s {row['phase']:8s} rss={row['rss_mib']:7.1f} MiB "
                  f"uss={row['uss_mib']:7.1f} redis={row.get('redis_rss_mib', float('nan')):6.1f} "
                  f"threads={row['threads']}", flush=True)
            await asyncio.sleep(self.interval)


class Load:
    """Question clients: real questions of the ingested documents, a share of them streamed (SSE)."""

    def __init__(self, url: str, questions: list[str], new_tokens: int, stream_share: float) -> None:
        self.url, self.questions, self.new_tokens, self.stream_every = url, questions, new_tokens, stream_share
        self.counter = 0
        self.reset()

    def reset(self) -> None:
        self.latencies: list[float] = []
        self.stream_latencies: list[float] = []
        self.errors: dict[str, int] = {}

    async def one(self, client: httpx.AsyncClient) -> None:
        i = self.counter
        self.counter += 1
        stream = self.stream_every > 0 and i % max(1, round(1 / self.stream_every)) == 0
        body = {"question": self.questions[i % len(self.questions)], "max_new_tokens": self.new_tokens,
                "top_k": 4, "stream": stream}
        t = time.perf_counter()
        try:
            if stream:
                async with client.stream("POST", "/ask", json=body) as r:
                    r.raise_for_status()
                    text = "".join([chunk async for chunk in r.aiter_text()])
                if "event: done" not in text:
                    raise RuntimeError("stream without done event")
                self.stream_latencies.append(time.perf_counter() - t)
            else:
                r = await client.post("/ask", json=body)
                r.raise_for_status()
                if "answer" not in r.json():
                    raise KeyError("answer")
                self.latencies.append(time.perf_counter() - t)
        except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
            key = f"{type(exc).__name__}: {str(exc)[:80]}"
            self.errors[key] = self.errors.get(key, 0) + 1

    async def run(self, clients: int, seconds: float) -> float:
        stop = time.perf_counter() + seconds
        async with httpx.AsyncClient(base_url=self.url, timeout=600) as client:

            async def worker() -> None:
                while time.perf_counter() < stop:
                    await self.one(client)

            start = time.perf_counter()
            await asyncio.gather(*[worker() for _ in range(clients)])
            return time.perf_counter() - start

    def summary(self, wall: float) -> dict:
        both = self.latencies + self.stream_latencies
        n_err = sum(self.errors.values())
        return {"requests": len(both) + n_err, "ok": len(both), "streamed": len(self.stream_latencies),
                "errors": n_err, "error_kinds": self.errors, "throughput_rps": len(both) / wall,
                "p50_ms": pct(both, 50) if both else None, "p95_ms": pct(both, 95) if both else None,
                "p50_ms_non_stream": pct(self.latencies, 50) if self.latencies else None,
                "p50_ms_stream": pct(self.stream_latencies, 50) if self.stream_latencies else None}


def slope_mib_per_min(rows: list[dict], key: str = "rss_mib") -> float | None:
    rows = [r for r in rows if key in r]
    if len(rows) < 2:
        return None
    t = np.array([r["t_s"] for r in rows]) / 60
    return float(np.polyfit(t, np.array([r[key] for r in rows]), 1)[0])


def memory_report(samples: list[dict], start: dict, end: dict) -> dict:
    window = [s for s in samples if s["phase"] == "measure"]
    window = [start, *[s for s in window if s is not start and s is not end], end]
    half = (start["t_s"] + end["t_s"]) / 2
    out = {"server": {
        "rss_end_of_warmup_mib": start["rss_mib"], "rss_end_mib": end["rss_mib"],
        "growth_pct": 100 * (end["rss_mib"] / start["rss_mib"] - 1),
        "slope_mib_per_min": slope_mib_per_min(window),
        "slope_first_half_mib_per_min": slope_mib_per_min([s for s in window if s["t_s"] <= half]),
        "slope_second_half_mib_per_min": slope_mib_per_min([s for s in window if s["t_s"] >= half]),
        "rss_max_mib": max(s["rss_mib"] for s in window),
        "uss_end_of_warmup_mib": start["uss_mib"], "uss_end_mib": end["uss_mib"],
        "uss_slope_mib_per_min": slope_mib_per_min(window, "uss_mib"),
        "threads_start": start["threads"], "threads_end": end["threads"],
        "threads_max": max(s["threads"] for s in window),
    }}
    if "redis_rss_mib" in start and "redis_rss_mib" in end:
        out["redis"] = {"rss_end_of_warmup_mib": start["redis_rss_mib"], "rss_end_mib": end["redis_rss_mib"],
                        "growth_pct": 100 * (end["redis_rss_mib"] / start["redis_rss_mib"] - 1),
                        "slope_mib_per_min": slope_mib_per_min(window, "redis_rss_mib"),
                        "rss_max_mib": max(s.get("redis_rss_mib", 0) for s in window)}
    return out


async def soak(args: argparse.Namespace, url: str, sampler: Sampler, load: Load) -> dict:
    task = asyncio.create_task(sampler.run())
    warm_wall = await load.run(args.clients, args.warmup)
    warm = load.summary(warm_wall)
    print("warm-up", json.dumps(warm), flush=True)
    load.reset()
    sampler.phase = "measure"
    start = sampler.sample()
    wall = await load.run(args.clients, args.duration)
    end = sampler.sample()
    task.cancel()
    async with httpx.AsyncClient(base_url=url) as client:
        metrics_text = (await client.get("/metrics")).text
    series = sum(1 for line in metrics_text.splitlines() if line and not line.startswith("#"))
    return {"warmup": warm, "measure": load.summary(wall), "measure_wall_s": wall,
            "memory": memory_report(sampler.samples, start, end), "metrics_series_at_end": series}


def stop_server(server: subprocess.Popen, redis: int | None) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if redis is not None and psutil.pid_exists(redis):  # the embedded redis-server the server started
        try:
            psutil.Process(redis).terminate()
        except psutil.NoSuchProcess:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=300, help="SQuAD test paragraphs ingested first")
    parser.add_argument("--warmup", type=float, default=60, help="seconds of questions before measuring")
    parser.add_argument("--duration", type=float, default=600, help="seconds of the measurement window")
    parser.add_argument("--clients", type=int, default=4, help="concurrent question clients")
    parser.add_argument("--stream-share", type=float, default=0.25, help="share of questions asked with stream=true")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--interval", type=float, default=10, help="seconds between RSS samples")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of the server (e.g. MALLOC_ARENA_MAX=2); repeatable")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()

    docs = read_docs(args.docs)
    questions = [d["questions"][i]["question"] for i in range(max(len(d["questions"]) for d in docs))
                 for d in docs if i < len(d["questions"])]  # round-robin over the documents
    data_dir = Path(tempfile.mkdtemp(prefix="cmt-soak-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server, log = start_server(data_dir, port, args.server_env)
    redis = None
    try:
        t = time.perf_counter()
        wait_ready(url, server, log)
        startup = time.perf_counter() - t
        redis = redis_pid(data_dir)
        rss_ready = psutil.Process(server.pid).memory_info().rss / MIB
        ingest_s = ingest(url, docs)
        rss_ingested = psutil.Process(server.pid).memory_info().rss / MIB
        print(f"ready in {startup:.1f}s (rss {rss_ready:.1f} MiB); ingested {len(docs)} docs in {ingest_s:.1f}s "
              f"(rss {rss_ingested:.1f} MiB); {len(questions)} questions", flush=True)
        sampler = Sampler(server.pid, redis, args.interval)
        load = Load(url, questions, args.new_tokens, args.stream_share)
        result = asyncio.run(soak(args, url, sampler, load))
        result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "startup_s": startup,
                  "rss_ready_mib": rss_ready, "ingest_s": ingest_s, "rss_after_ingest_mib": rss_ingested,
                  "questions_available": len(questions), **result, "samples": sampler.samples}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k] for k in ("measure", "memory", "metrics_series_at_end")}, indent=2))
    finally:
        stop_server(server, redis)
        if server.returncode not in (0, None, -signal.SIGTERM):
            print(log.read_text()[-4000:], file=sys.stderr)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
