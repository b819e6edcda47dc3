"""A real service (the tiny test models, the real Redis) served by uvicorn on a free port, with
some traffic of every kind already sent, shared by the deployment tests of one session."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.storage.redis_store import RedisMemoryStore
from tests.service.api.conftest import REDIS_URL, make_settings

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send_traffic(base: str, rounds: int = 3) -> None:
    """Documents (new, unchanged, rejected), questions (plain, streamed, invalid), reads, a 404."""
    with httpx.Client(base_url=base, timeout=60) as c:
        for r in range(rounds):
            docs = [{"id": f"doc-{r}-{i}", "text": f"Item {i} of round {r}: the Varn river rose {i} metres.",
                     "title": f"t{i}", "source": "wire"} for i in range(4)]
            assert c.post("/documents", json={"documents": docs}).status_code == 200
            assert c.post("/documents", json={"documents": docs[:1]}).status_code == 200
            duplicate = {"documents": [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]}
            assert c.post("/documents", json=duplicate).status_code == 422
            assert c.post("/ask", json={"question": f"How high did the Varn rise in round {r}?"}).status_code == 200
            assert c.post("/ask", json={"question": "Anything?", "stream": True}).status_code == 200
            assert c.post("/ask", json={"question": ""}).status_code == 422
            assert c.get("/documents", params={"limit": 5}).status_code == 200
            assert c.get("/documents/missing").status_code == 404


class Served:
    def __init__(self, model_dirs) -> None:
        self.settings = make_settings(model_dirs)
        self.app = create_app(self.settings)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="cmt-uvicorn", daemon=True)

    def start(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.05)
        # Bank statistics are cached 15 s by default: a test scrapes more often than that.
        self.app.state.cmt.metrics.bank_stats_ttl_s = 0.5
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        RedisMemoryStore(REDIS_URL, bank=self.settings.bank).drop_bank()


@pytest.fixture(scope="session")
def served(model_dirs):
    s = Served(model_dirs).start()
    try:
        send_traffic(s.base)
        yield s
    finally:
        s.stop()
