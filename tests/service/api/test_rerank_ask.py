"""/ask with a checkpoint that re-ranks the index's best documents by their sentences
(AggregatorConfig.rerank_candidates): the service picks what the offline selection picks, from the texts it
stored, and reports the re-ranked score."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.models.config import DEFAULT_BACKBONE, CMTConfig
from service.storage.redis_store import RedisMemoryStore
from tests.conftest import save_model_dirs, small_cmt_config, tiny_gpt2
from tests.service.api.conftest import REDIS_URL, make_settings
from tests.service.models.test_sentence_rerank import ANSWERING, NEAR, QUESTION

DOCS = [{"id": "answers", "text": ANSWERING}, {"id": "near", "text": NEAR},
        {"id": "zurich", "text": "Zurich lies at the north end of Lake Zurich."}]


def _dirs(root, bpe_tokenizer, minilm, rerank_candidates: int, **rerank):
    base = small_cmt_config(key_encoder=DEFAULT_BACKBONE, key_dim=1024, lexical_key_weight=1.2)
    aggregator = dataclasses.replace(base.aggregator, rerank_candidates=rerank_candidates, **rerank)
    config = CMTConfig(base.compressor, aggregator, base.aligner)
    return save_model_dirs(root, tiny_gpt2(bpe_tokenizer), bpe_tokenizer, config, minilm)


@pytest.mark.parametrize(("rerank_candidates", "rerank", "expected"), [
    (0, {}, "near"), (4, {}, "answers"),
    (4, {"rerank_lexical_weight": 0.12, "rerank_sentence_candidates": 2, "rerank_sentence_weight": 0.6}, "answers"),
])
def test_ask_reranks_the_best_candidates_by_their_sentences(
    tmp_path, bpe_tokenizer, minilm, rerank_candidates, rerank, expected
):
    settings = make_settings(_dirs(tmp_path, bpe_tokenizer, minilm, rerank_candidates, **rerank))
    try:
        with TestClient(create_app(settings)) as client:
            assert client.post("/documents", json={"documents": DOCS}).status_code == 200
            ask = client.post("/ask", json={"question": QUESTION, "top_k": 1}).json()
            assert [s["id"] for s in ask["sources"]] == [expected]
            assert ("rerank" in ask["timings_ms"]) == bool(rerank_candidates)
            modules, store = client.app.state.cmt.engine.modules, RedisMemoryStore(REDIS_URL, bank=settings.bank)
            key = modules.compressor.compress([QUESTION]).key.float()  # (1, d_k)
            stored = {i: m.key for i, m in zip([d["id"] for d in DOCS], store.get_memories([d["id"] for d in DOCS]),
                                               strict=True)}
            key_score = float(key[0] @ stored[expected].float())
            if rerank_candidates:
                assert ask["sources"][0]["score"] > key_score + 0.1, "the re-ranked score adds the sentence's"
                # the answering text has the pool's best BM25, so alone it scores as it did among the others
                pool = (key[0] @ stored[expected].float())[None, None]  # (1, 1)
                offline = modules.reranker([QUESTION], key, pool, [[ANSWERING]])
                assert ask["sources"][0]["score"] == pytest.approx(float(offline[0, 0]), abs=1e-3)
                two = client.post("/ask", json={"question": QUESTION, "top_k": 2}).json()
                assert {s["id"] for s in two["sources"]} == {"answers", "near"}  # (listed newest first)
            else:
                assert ask["sources"][0]["score"] == pytest.approx(key_score, abs=1e-3)
    finally:
        RedisMemoryStore(REDIS_URL, bank=settings.bank).drop_bank()
