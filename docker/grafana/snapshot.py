"""Draws the dashboard's main panels (docs/dashboard.png) from a real Prometheus scraping a real
service under load: what the README shows.

    .venv/bin/python docker/grafana/snapshot.py [--seconds 60] [--out docs/dashboard.png]

Serves the demo models (built once into .data/demo) with uvicorn in this process against the Redis
at 127.0.0.1:6379 (a throw-away bank, dropped at the end), starts Debian's `prometheus` scraping it
every second, drives it with concurrent clients (questions, streamed questions, SQuAD paragraphs
as documents, a few invalid requests), then evaluates the dashboard's own queries over the run
with Prometheus' query_range API and plots them with matplotlib.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "cmt-service.json"
SQUAD = ROOT.parent / "shared" / "data" / "squad" / "train.jsonl.gz"
REDIS = "redis://127.0.0.1:6379/0"
# (panel title in the dashboard, plot title, y unit)
PANELS = [
    ("/ask latency p50 / p95 / p99", "/ask latency", "s"),
    ("/ask p95 latency by stage", "/ask p95 latency by stage", "s"),
    ("Request rate by route", "requests/s by route", "req/s"),
    ("Ingest rate (documents/s)", "ingest (documents/s)", "docs/s"),
    ("Queue depth", "batcher queue depth", "items"),
    ("Documents in the bank", "documents in the bank", "docs"),
    ("Bytes in the bank", "bytes in the bank", "bytes"),
    ("Redis latency p99 by operation", "Redis p99 latency by operation", "s"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def paragraphs() -> list[str]:
    if SQUAD.is_file():
        with gzip.open(SQUAD, "rt") as fh:
            return [json.loads(line)["text"] for _, line in zip(range(3000), fh, strict=False)]
    return [f"News item {i}: the river rose {i % 7} metres at station {i}." for i in range(3000)]


def serve():
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(redis_url=REDIS, bank=f"snap{uuid.uuid4().hex[:8]}", default_max_new_tokens=16)
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    app.state.cmt.metrics.bank_stats_ttl_s = 1.0
    return server, settings, port


async def load(base: str, seconds: float, texts: list[str]) -> None:
    stop = time.monotonic() + seconds
    rng = random.Random(0)

    async def asker(c: httpx.AsyncClient, stream: bool) -> None:
        while time.monotonic() < stop:
            q = rng.choice(texts)[:120] + "?"
            await c.post("/ask", json={"question": q, "top_k": 4, "stream": stream})

    async def ingester(c: httpx.AsyncClient) -> None:
        i = 0
        while time.monotonic() < stop:
            batch = [{"id": f"p{i + j}", "text": texts[(i + j) % len(texts)]} for j in range(8)]
            await c.post("/documents", json={"documents": batch})
            if i % 80 == 0:  # an invalid request now and then (422)
                await c.post("/documents", json={"documents": [{"id": "x", "text": " "}]})
            i += 8
            await asyncio.sleep(0.2)

    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        await asyncio.gather(ingester(c), *(asker(c, False) for _ in range(4)), asker(c, True))


def queries() -> dict[str, list[tuple[str, str]]]:
    board = json.loads(DASHBOARD.read_text())
    out = {}
    for p in board["panels"]:
        if p.get("targets"):
            out[p["title"]] = [
                (t["expr"].replace("$__rate_interval", "10s").replace("$instance", ".+"), t["legendFormat"])
                for t in p["targets"]
            ]
    return out


def legend(fmt: str, labels: dict) -> str:
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out.replace("{{instance}}", "").strip() or "value"


def plot(series: dict, out: Path, t0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(4, 2, figsize=(11, 11), constrained_layout=True)
    for ax, (key, title, unit) in zip(axes.flat, PANELS, strict=True):
        for name, xs, ys in series[key]:
            ax.plot([x - t0 for x in xs], ys, label=name, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.yaxis.set_major_formatter(EngFormatter(unit="s" if unit == "s" else "B" if unit == "bytes" else ""))
        ax.set_ylabel(unit if unit not in ("s", "bytes") else "", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if series[key]:
            ax.legend(fontsize=7, ncol=2, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("seconds into the run", fontsize=8)
    fig.suptitle("CMT memory service under load (Prometheus scrape of a running service)", fontsize=11)
    fig.savefig(out, dpi=72)
    from PIL import (
        Image,  # matplotlib's own dependency: a 256-colour palette keeps the PNG small
    )

    Image.open(out).convert("RGB").quantize(colors=64).save(out, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = ap.parse_args()
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        sys.exit("prometheus is not installed (apt-get install prometheus)")
    server, settings, port = serve()
    tmp = Path(tempfile.mkdtemp(prefix="cmt-snap-"))
    pport = free_port()
    (tmp / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "cmt", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }))
    prom = subprocess.Popen([prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{pport}", "--log.level=warn"])
    try:
        time.sleep(3)
        t0 = time.time()
        asyncio.run(load(f"http://127.0.0.1:{port}", args.seconds, paragraphs()))
        time.sleep(3)
        t1 = time.time()
        api = f"http://127.0.0.1:{pport}/api/v1/query_range"
        qs = queries()
        series = {}
        for key, _, _ in PANELS:
            series[key] = []
            for expr, fmt in qs[key]:
                body = httpx.get(api, params={"query": expr, "start": t0, "end": t1, "step": 2}).json()
                assert body["status"] == "success", body
                for r in body["data"]["result"]:
                    xs = [float(x) for x, _ in r["values"]]
                    ys = [float(y) for _, y in r["values"]]
                    series[key].append((legend(fmt, r["metric"]), xs, ys))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plot(series, args.out, t0)
        print(f"wrote {args.out}")
    finally:
        prom.terminate()
        prom.wait(timeout=10)
        server.should_exit = True
        time.sleep(1)
        from service.storage.redis_store import RedisMemoryStore

        RedisMemoryStore(REDIS, bank=settings.bank).drop_bank()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
