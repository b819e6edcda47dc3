"""Redis going away: clear 503s and /readyz false, then recovery without restarting the service."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.storage.embedded import free_port, wait_until_answers
from tests.service.api.conftest import make_settings


def start_redis(port: int, data_dir) -> subprocess.Popen:
    proc = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    wait_until_answers(f"redis://127.0.0.1:{port}/0", 30.0, proc)  # a loaded machine starts it slowly
    return proc


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_down_gives_503_and_the_service_recovers_when_it_is_back(model_dirs, tmp_path):
    port = free_port()
    redis_proc = start_redis(port, tmp_path)
    settings = make_settings(model_dirs, redis_url=f"redis://127.0.0.1:{port}/0")
    try:
        with TestClient(create_app(settings)) as client:
            doc = {"documents": [{"id": "a", "text": "The Varn river rose two metres."}]}
            assert client.post("/documents", json=doc).status_code == 200

            redis_proc.terminate()
            redis_proc.wait(timeout=10)
            for r in (
                client.post("/documents", json={"documents": [{"id": "b", "text": "Lost?"}]}),
                client.post("/ask", json={"question": "How high did the Varn rise?"}),
                client.get("/documents/a"),
            ):
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "storage_unavailable" and r.headers["retry-after"]
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["redis"] is False
            assert client.get("/healthz").status_code == 200

            redis_proc = start_redis(port, tmp_path)  # same AOF: acknowledged data is back
            assert client.get("/readyz").status_code == 200
            assert client.get("/documents/a").status_code == 200
            assert client.get("/documents/b").status_code == 404, "a write that got 503 must not exist"
            ask = client.post("/ask", json={"question": "How high did the Varn rise?"})
            assert ask.status_code == 200 and [s["id"] for s in ask.json()["sources"]] == ["a"]
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=10)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_embedded_redis_killed_under_the_service_comes_back_by_itself(model_dirs, tmp_path):
    import json
    import os
    import signal

    folder = tmp_path / "embedded"
    settings = make_settings(model_dirs, redis_url=None, data_dir=folder)
    with TestClient(create_app(settings)) as client:
        first = {"documents": [{"id": "a", "text": "The Varn river rose two metres."}]}
        assert client.post("/documents", json=first).status_code == 200
        os.kill(json.loads((folder / "server.json").read_text())["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (client.get("/readyz").status_code != 200
               or "cmt_embedded_redis_restarts_total 1.0" not in client.get("/metrics").text):
            assert time.monotonic() < deadline, "the embedded Redis did not come back"
            time.sleep(0.1)
        assert client.get("/documents/a").status_code == 200  # acknowledged before the crash, back from the AOF
        second = {"documents": [{"id": "b", "text": "Snow fell in Oskel."}]}
        assert client.post("/documents", json=second).status_code == 200
        ask = client.post("/ask", json={"question": "How high did the Varn rise?", "top_k": 2})
        assert ask.status_code == 200 and {s["id"] for s in ask.json()["sources"]} == {"a", "b"}
