"""`cmt-reindex`: after a new checkpoint, stored memories are re-made from the stored text."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import service.storage.reindex
from service.app import create_app
from service.cli import reindex_main
from service.models.checkpoint import save_checkpoint
from service.models.cmt import CMTModules
from service.models.compressor import Compressor
from service.models.llm import HFCausalLM
from service.storage.redis_store import RedisMemoryStore
from tests.conftest import small_cmt_config
from tests.service.api.conftest import REDIS_URL, make_settings


def test_reindex_moves_every_memory_to_the_new_checkpoint_and_questions_see_them_again(model_dirs, minilm, tmp_path):
    llm_dir, old_ckpt = model_dirs
    llm = HFCausalLM.from_pretrained(str(llm_dir))
    torch.manual_seed(123)
    config = small_cmt_config()
    new_modules = CMTModules(config, Compressor(config.compressor, copy.deepcopy(minilm[0]), minilm[1]), llm.layout)
    save_checkpoint(tmp_path / "new", new_modules, llm.identity)
    new_version = json.loads((tmp_path / "new" / "config.json").read_text())["compressor_version"]

    old = make_settings(model_dirs)
    store = RedisMemoryStore(REDIS_URL, bank=old.bank)
    try:
        with TestClient(create_app(old)) as client:
            docs = [{"id": f"d{i}", "text": f"Item {i}: the Qelmar bridge carried {i} trains."} for i in range(5)]
            assert client.post("/documents", json={"documents": docs}).status_code == 200

        new = make_settings(model_dirs, checkpoint=tmp_path / "new", bank=old.bank)
        with TestClient(create_app(new)) as client:  # new checkpoint, old memories: none served
            assert client.get("/readyz").json()["checks"]["stale_documents"] == 5
            assert client.post("/ask", json={"question": "How many trains?"}).json()["sources"] == []

        argv = ["--llm", str(llm_dir), "--checkpoint", str(tmp_path / "new"), "--redis-url", REDIS_URL,
                "--bank", old.bank, "--batch-size", "2", "--no-progress"]
        assert reindex_main(argv) == 0
        assert store.stale_count(new_version) == 0
        assert {m.compressor_version for m in store.get_memories([f"d{i}" for i in range(5)])} == {new_version}

        with TestClient(create_app(new)) as client:
            sources = client.post("/ask", json={"question": "How many trains?", "top_k": 3}).json()["sources"]
            assert len(sources) == 3
    finally:
        store.drop_bank()


def test_cmt_reindex_is_one_command_with_the_flags_of_both_former_ones(capsys):
    with pytest.raises(SystemExit) as exited:
        reindex_main(["--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--llm", "--checkpoint", "--redis-url", "--data-dir", "--bank", "--batch-size", "--no-progress"):
        assert flag in help_text, flag
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["cmt-reindex"] == "service.cli:reindex_main"
    assert not hasattr(service.storage.reindex, "main")  # the second, differently flagged command is gone
