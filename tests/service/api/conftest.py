"""A tiny LLM and a checkpoint saved to disk, and an app serving them against the real Redis."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.models.checkpoint import save_checkpoint
from service.settings import Settings
from service.storage.redis_store import RedisMemoryStore
from tests.conftest import tiny_gpt2

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, bpe_tokenizer, minilm):
    """(llm_dir, checkpoint_dir): saved with save_pretrained / save_checkpoint, loaded back by path."""
    import copy

    import torch

    from service.models.cmt import CMTModules
    from service.models.compressor import Compressor
    from tests.conftest import small_cmt_config

    root = tmp_path_factory.mktemp("models")
    llm = tiny_gpt2(bpe_tokenizer)
    llm.model.save_pretrained(root / "llm")
    bpe_tokenizer.save_pretrained(root / "llm")
    torch.manual_seed(0)
    config = small_cmt_config()
    backbone, tokenizer = minilm
    modules = CMTModules(config, Compressor(config.compressor, copy.deepcopy(backbone), tokenizer), llm.layout)
    save_checkpoint(root / "ckpt", modules, llm.identity)
    return root / "llm", root / "ckpt"


def make_settings(model_dirs, **overrides) -> Settings:
    llm_dir, ckpt = model_dirs
    values = dict(llm=str(llm_dir), checkpoint=ckpt, redis_url=REDIS_URL, bank=f"t{uuid.uuid4().hex[:12]}",
                  default_max_new_tokens=4, batch_wait_ms=2)
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
