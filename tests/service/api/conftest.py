"""An app serving the tiny models of `model_dirs` (tests/conftest.py) against the real Redis."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.storage.redis_store import RedisMemoryStore

REDIS_URL = "redis://127.0.0.1:6379/0"


def make_settings(model_dirs, **overrides) -> Settings:
    llm_dir, ckpt = model_dirs
    # float32 whatever the CPU: these tests compare served answers with the offline pipeline's float32 ones
    values = dict(llm=str(llm_dir), checkpoint=ckpt, redis_url=REDIS_URL, bank=f"t{uuid.uuid4().hex[:12]}",
                  default_max_new_tokens=4, batch_wait_ms=2, dtype="float32")
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(model_dirs) -> Settings:
    s = make_settings(model_dirs)
    yield s
    RedisMemoryStore(REDIS_URL, bank=s.bank).drop_bank()


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c
