"""A checkpoint whose retrieval key is wider than its memory (a frozen key encoder plus the lexical part,
stored in codec format 2) served end to end: ingest, ask, and a restart that rebuilds the index from the
keys read back from Redis, and one that loads it from its snapshot."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.models.config import DEFAULT_BACKBONE
from service.storage.redis_store import RedisMemoryStore
from tests.conftest import save_model_dirs, small_cmt_config, tiny_gpt2
from tests.service.api.conftest import REDIS_URL, make_settings

DOCS = [
    {"id": "varn", "text": "The Varnholt bridge over the Oskel river reopened on Monday after repairs."},
    {"id": "qel", "text": "Qelmar Labs announced a new battery chemistry at its Basel plant."},
    {"id": "tide", "text": "Fishermen in Dunmore reported the highest spring tide in thirty years."},
]


@pytest.fixture(scope="module")
def wide_key_dirs(tmp_path_factory, bpe_tokenizer, minilm):
    config = small_cmt_config(key_encoder=DEFAULT_BACKBONE, key_dim=1024, lexical_key_weight=1.2)
    return save_model_dirs(tmp_path_factory.mktemp("wide"), tiny_gpt2(bpe_tokenizer), bpe_tokenizer, config, minilm)


@pytest.mark.parametrize("snapshots", [False, True])
def test_wide_key_checkpoint_ingests_answers_and_restarts(wide_key_dirs, tmp_path, snapshots):
    settings = make_settings(wide_key_dirs, index_snapshots=snapshots, index_snapshot_dir=tmp_path / "snap")
    question = {"question": "When did the Varnholt bridge reopen?", "top_k": 1}
    try:
        with TestClient(create_app(settings)) as client:
            out = client.post("/documents", json={"documents": DOCS}).json()["documents"]
            assert all(d["memory_bytes"] > 2 * 1024 for d in out), "an fp16 key of 1024 values is stored"
            first = client.post("/ask", json=question).json()
            assert [s["id"] for s in first["sources"]] == ["varn"]
        assert any((tmp_path / "snap").glob("*")) == snapshots, "a clean shutdown writes the snapshot"
        with TestClient(create_app(settings)) as client:  # a restart: the index from Redis or its snapshot
            again = client.post("/ask", json=question).json()
            assert [s["id"] for s in again["sources"]] == ["varn"]
            assert again["answer"] == first["answer"]
            assert client.get("/documents").json()["count"] == 3
    finally:
        RedisMemoryStore(REDIS_URL, bank=settings.bank).drop_bank()


def test_a_bank_written_with_narrower_keys_still_starts_and_serves_the_new_checkpoints_memories(
    model_dirs, wide_key_dirs, tmp_path
):
    # Upgrading the checkpoint (384-wide keys → 1,024-wide) on a bank that holds the old memories: the service
    # starts, never answers from the old memories (another compressor), and counts them as stale for cmt-reindex.
    old = make_settings(model_dirs, index_snapshot_dir=tmp_path / "snap")
    new = make_settings(wide_key_dirs, bank=old.bank, index_snapshot_dir=tmp_path / "snap")
    question = {"question": "When did the Varnholt bridge reopen?", "top_k": 1}
    try:
        with TestClient(create_app(old)) as client:
            assert client.post("/documents", json={"documents": DOCS[1:]}).status_code == 200
        with TestClient(create_app(new)) as client:
            assert client.post("/ask", json=question).json()["sources"] == []
            assert client.post("/documents", json={"documents": DOCS[:1]}).status_code == 200
            assert [s["id"] for s in client.post("/ask", json=question).json()["sources"]] == ["varn"]
            assert "cmt_index_stale_documents 2.0" in client.get("/metrics").text
    finally:
        RedisMemoryStore(REDIS_URL, bank=old.bank).drop_bank()
