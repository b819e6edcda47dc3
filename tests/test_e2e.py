"""End to end: the real `cmt-serve` in a subprocess, its embedded Redis with AOF, real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from trainer.data import SyntheticConfig, synthetic_stream, write_jsonl
from trainer.evaluate import main as evaluate

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, llm_dir: Path, ckpt: Path, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "service.cli", "--port", str(self.port), "--llm", str(llm_dir),
                     "--checkpoint", str(ckpt), "--data-dir", str(data_dir)]
        self.data_dir = data_dir
        self.env = {**os.environ, "CMT_DEFAULT_MAX_NEW_TOKENS": "4", "CMT_BANK": "e2e"}
        self.proc: subprocess.Popen | None = None
        self.log = data_dir.parent / "server.log"

    def start(self) -> Server:
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready: {self.log.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)

    def stop_redis(self) -> None:
        info = self.data_dir / "server.json"
        if info.exists():
            try:
                os.kill(json.loads(info.read_text())["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    srv = Server(*model_dirs, tmp_path_factory.mktemp("e2e") / "redis").start()
    yield srv
    if srv.proc.poll() is None:
        srv.kill(signal.SIGTERM)
    srv.stop_redis()


def test_ingest_ask_delete_and_survive_a_killed_service(server):
    docs = [{"id": f"n{i}", "text": f"Report {i}: the Varn river rose {i} metres in Oskel.", "title": f"T{i}"}
            for i in range(6)]
    r = httpx.post(server.url + "/documents", json={"documents": docs}, timeout=60)
    assert r.status_code == 200 and all(d["status"] == "new" for d in r.json()["documents"])
    question = {"question": "How high did the Varn rise?", "top_k": 4}
    ask = httpx.post(server.url + "/ask", json=question, timeout=60).json()
    assert len(ask["sources"]) == 4 and isinstance(ask["answer"], str)

    victim = ask["sources"][0]["id"]
    assert httpx.delete(server.url + f"/documents/{victim}", timeout=10).status_code == 200
    again = httpx.post(server.url + "/ask", json=question, timeout=60).json()
    assert victim not in {s["id"] for s in again["sources"]}

    server.kill(signal.SIGKILL)  # no graceful shutdown at all
    server.start()
    listing = httpx.get(server.url + "/documents", timeout=10).json()
    assert listing["count"] == 5 and victim not in {d["id"] for d in listing["documents"]}
    after = httpx.post(server.url + "/ask", json=question, timeout=60).json()
    assert {s["id"] for s in after["sources"]} == {s["id"] for s in again["sources"]}


def test_32_concurrent_questions_and_8_concurrent_ingests_all_succeed(server):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            stop_at = time.monotonic() + 4.0
            out: list[httpx.Response] = []

            async def asker(i: int) -> None:
                while time.monotonic() < stop_at:
                    out.append(await client.post("/ask", json={"question": f"What happened in Oskel, item {i}?"}))

            async def ingester(i: int) -> None:
                n = 0
                while time.monotonic() < stop_at:
                    n += 1
                    doc = {"id": f"c{i}-{n}", "text": f"Concurrent report {i}.{n} about the Varn river."}
                    out.append(await client.post("/documents", json={"documents": [doc]}))

            await asyncio.gather(*[asker(i) for i in range(32)], *[ingester(i) for i in range(8)])
            return out

    responses = asyncio.run(run())
    assert len(responses) >= 40
    bad = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert not bad, bad[:5]
    for r in responses:
        body = r.json()
        assert ("answer" in body and isinstance(body["sources"], list)) or len(body["documents"]) == 1


def test_fuzzed_requests_from_the_openapi_schema_never_get_a_5xx(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/documents", "/ask", "/documents/{doc_id}"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case) -> None:
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        call()


def test_evaluation_command_streams_a_test_set_through_the_running_service(server, tmp_path):
    docs = synthetic_stream(SyntheticConfig(seed=4, num_entities=20, kinds=("city",), pool_size=4, fillers=0))["train"]
    write_jsonl(tmp_path / "news-test.jsonl", docs)
    out = tmp_path / "report"
    assert evaluate(["--service-url", server.url, "--data", str(tmp_path / "news-{split}.jsonl"), "--concurrency", "4",
                     "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    (row,) = report["rows"]
    assert row["row"] == f"CMT through the service ({server.url})"
    assert row["ingest"]["documents"] == len(docs) and row["ingest"]["docs_per_s"] > 0
    assert report["questions"] == sum(len(d["questions"]) for d in docs)
    assert "docs/s" in (out / "report.md").read_text()
