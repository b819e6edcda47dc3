"""A checkpoint that stores its token-pool memory as token picks (CompressorConfig.stored_picks, codec format 3)
served end to end: ingest stores ids and weights instead of the k×d_m memory, /ask rebuilds the memory Θ made,
a restart rebuilds the index from the stored values, and cmt-reindex moves a bank of dense memories to picks.
With AggregatorConfig.select_slots, /ask reads the slots each question chooses, as the offline pipeline does."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli import reindex_main
from service.models.aggregator import select_top_k
from service.models.checkpoint import checkpoint_profile, load_checkpoint
from service.models.cmt import Bank, CMTPipeline
from service.models.config import AggregatorConfig, AlignerConfig, CMTConfig, CompressorConfig
from service.models.llm import GenerationConfig, HFCausalLM
from service.runtime.engine import Engine
from service.storage import codec
from service.storage.redis_store import RedisMemoryStore
from tests.conftest import save_model_dirs, small_cmt_config, tiny_gpt2
from tests.service.api.conftest import REDIS_URL, make_settings

DOCS = [
    {"id": "varn", "text": "The Varnholt bridge over the Oskel river reopened on Monday after repairs."},
    {"id": "qel", "text": "Qelmar Labs announced a new battery chemistry at its Basel plant."},
    {"id": "tide", "text": "Fishermen in Dunmore reported the highest spring tide in thirty years."},
]
PICKS = 8


def _dirs(root, bpe_tokenizer, minilm, picks: int):
    config = small_cmt_config(memory_values="token_embeddings", stored_picks=picks)
    return save_model_dirs(root, tiny_gpt2(bpe_tokenizer), bpe_tokenizer, config, minilm)


@pytest.fixture(scope="module")
def picks_dirs(tmp_path_factory, bpe_tokenizer, minilm):
    return _dirs(tmp_path_factory.mktemp("picks"), bpe_tokenizer, minilm, PICKS)


def test_stored_picks_are_small_and_rebuild_the_memory_theta_made(picks_dirs):
    settings = make_settings(picks_dirs)
    store = RedisMemoryStore(REDIS_URL, bank=settings.bank)
    try:
        with TestClient(create_app(settings)) as client:
            engine: Engine = client.app.state.cmt.engine
            out = client.post("/documents", json={"documents": DOCS}).json()["documents"]
            k, d_k = engine.num_memory_tokens, engine.modules.config.compressor.retrieval_key_dim
            assert {d["memory_bytes"] for d in out} == {engine.memory_value_bytes()}  # the values' real length
            header = 20 + len(engine.compressor_version)
            assert engine.memory_value_bytes() == header + 2 * d_k + k * PICKS * (4 + 2)  # not + 2·k·d_m

            stored = store.get_memories([d["id"] for d in DOCS])
            assert all(isinstance(m.memory, codec.TokenPicks) and m.memory.shape == (k, PICKS) for m in stored)
            theta = engine.compress([d["text"] for d in DOCS])  # memory (3, k, d_m): what Θ made
            rebuilt = engine.dense_memories([m.memory for m in stored])  # (3, k, d_m) fp16
            assert torch.allclose(rebuilt.float(), theta.memory.float().cpu(), atol=2e-3, rtol=1e-2)

            question = {"question": "When did the Varnholt bridge reopen?", "top_k": 1}
            first = client.post("/ask", json=question).json()
            assert [s["id"] for s in first["sources"]] == ["varn"]
        with TestClient(create_app(settings)) as client:  # the index rebuilt from the format-3 values
            again = client.post("/ask", json=question).json()
            assert [s["id"] for s in again["sources"]] == ["varn"] and again["answer"] == first["answer"]
    finally:
        store.drop_bank()


def test_reindex_moves_a_bank_of_dense_memories_to_token_picks(picks_dirs, bpe_tokenizer, minilm, tmp_path):
    llm_dir, picks_ckpt = picks_dirs
    dense_dirs = _dirs(tmp_path, bpe_tokenizer, minilm, 0)
    old = make_settings(dense_dirs, llm=str(llm_dir))
    store = RedisMemoryStore(REDIS_URL, bank=old.bank)
    try:
        with TestClient(create_app(old)) as client:
            assert client.post("/documents", json={"documents": DOCS}).status_code == 200
        assert all(isinstance(m.memory, torch.Tensor) for m in store.get_memories([d["id"] for d in DOCS]))

        version = json.loads((picks_ckpt / "config.json").read_text())["compressor_version"]
        argv = ["--llm", str(llm_dir), "--checkpoint", str(picks_ckpt), "--redis-url", REDIS_URL, "--bank", old.bank,
                "--no-progress"]
        assert reindex_main(argv) == 0
        stored = store.get_memories([d["id"] for d in DOCS], compressor_version=version)
        assert all(isinstance(m.memory, codec.TokenPicks) for m in stored)
    finally:
        store.drop_bank()


@pytest.fixture(scope="module", params=[(4, "stretch"), (1, "distinct"), (1, "spaced")],
                ids=["stretch", "distinct", "spaced"])
def select_dirs(request, tmp_path_factory, bpe_tokenizer, minilm):
    picks, rule = request.param
    config = CMTConfig(
        compressor=CompressorConfig(num_memory_tokens=12, num_layers=1, num_heads=4, memory_values="token_embeddings",
                                    stored_picks=picks, pick_rule=rule),
        aggregator=AggregatorConfig(top_k=2, max_docs=8, num_layers=1, num_heads=4, queries="memories",
                                    identity_init=True, select_slots=4),
        aligner=AlignerConfig(prefix_len=4, hidden_dim=64),
    )
    return save_model_dirs(tmp_path_factory.mktemp("select"), tiny_gpt2(bpe_tokenizer), bpe_tokenizer, config, minilm)


def test_slots_chosen_by_the_question_are_served_as_the_offline_pipeline_chooses_them(select_dirs):
    llm_dir, ckpt = select_dirs
    settings = make_settings(select_dirs)
    question = "When did the Varnholt bridge over the Oskel reopen?"
    store = RedisMemoryStore(REDIS_URL, bank=settings.bank)
    try:
        with TestClient(create_app(settings)) as client:
            assert client.post("/documents", json={"documents": DOCS}).status_code == 200
            body = {"question": question, "max_new_tokens": 6, "top_k": 1}
            served = client.post("/ask", json=body).json()
            streamed = client.post("/ask", json={**body, "stream": True}).text
            two = client.post("/ask", json={**body, "top_k": 2}).json()  # two documents' chosen slots
            assert len(two["sources"]) == 2
    finally:
        store.drop_bank()

    llm = HFCausalLM.from_pretrained(str(llm_dir))
    modules, config = load_checkpoint(ckpt, llm.identity, llm.layout)
    pipeline = CMTPipeline(modules, llm, checkpoint_profile(config))
    mem = pipeline.compress([d["text"] for d in DOCS])
    picks = (mem.picks[0], mem.picks[1].half())  # what the service stores
    memory = modules.compressor.memory_from_picks(*picks).half().float()
    bank = Bank(memory, mem.key.half().float(), torch.zeros(len(DOCS)), [d["id"] for d in DOCS], picks)
    profile = checkpoint_profile(config)
    offline = pipeline.answer([question], bank, top_k=1,
                              generation=GenerationConfig(max_new_tokens=6, stop_strings=profile.stop_strings))[0]
    assert [s["id"] for s in served["sources"]] == offline.source_ids == ["varn"]
    assert served["answer"] == offline.text
    pieces = [json.loads(line[6:])["text"] for line in streamed.splitlines() if line.startswith('data: {"text"')]
    assert "".join(pieces).strip() == offline.text
    slots = modules.choose_slots([question], *bank.gather_picks(select_top_k(mem.key[:1], mem.key, 1)))
    assert slots.shape == (1, 4)
