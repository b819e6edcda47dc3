"""The sentence re-ranker (AggregatorConfig.rerank_candidates) with the real MiniLM as the key encoder."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from service.errors import InvalidInputError
from service.models.cmt import Bank, CMTModules
from service.models.config import DEFAULT_BACKBONE, AggregatorConfig, CMTConfig
from service.models.sentence_rerank import SentenceKeys, split_sentences
from tests.conftest import minilm_compressor, small_cmt_config, tiny_gpt2

QUESTION = "Which river flows through Basel?"
ANSWERING = ("Basel is home to a large chemical and pharmaceutical industry. Its zoo is the oldest in Switzerland. "
             "The city hosts an art fair every June. The university was founded in 1460. "
             "Its carnival starts at four in the morning. The Rhine flows through Basel.")
"""Answers in one short sentence among five about other things: its pooled key is diluted."""
NEAR = "Basel draws many visitors every summer. Its river banks are crowded then."
"""Names Basel and a river in every sentence, answers nothing: its pooled key scores higher."""


def _modules(minilm, bpe_tokenizer, rerank_candidates: int) -> CMTModules:
    base = small_cmt_config(key_encoder=DEFAULT_BACKBONE, key_dim=1024, lexical_key_weight=1.2)
    config = CMTConfig(base.compressor, dataclasses.replace(base.aggregator, rerank_candidates=rerank_candidates),
                       base.aligner)
    torch.manual_seed(0)
    return CMTModules(config, minilm_compressor(config.compressor, minilm), tiny_gpt2(bpe_tokenizer).layout).eval()


def _bank(modules: CMTModules, texts: list[str]) -> Bank:
    out = modules.compressor.compress(texts)
    return Bank(out.memory, out.key, torch.arange(float(len(texts))), [f"d{i}" for i in range(len(texts))],
                texts=texts)


def test_split_sentences_keeps_abbreviations_and_always_returns_the_text():
    assert split_sentences("The Rhine flows. It is long! Is it? 1460 was a year.") == [
        "The Rhine flows.", "It is long!", "Is it?", "1460 was a year."]
    assert split_sentences("It rose, e.g. by 3.5 per cent.") == ["It rose, e.g. by 3.5 per cent."]
    assert split_sentences("   no end mark  ") == ["no end mark"]


def test_sentence_keys_are_each_sentences_key_encoder_embedding_and_are_cached(minilm, bpe_tokenizer):
    encoder = _modules(minilm, bpe_tokenizer, 2).compressor.key_encoder
    keys = SentenceKeys(encoder)
    first, near = keys([ANSWERING, NEAR])
    expected = encoder(encoder.tokenize(split_sentences(ANSWERING)))  # (6, 384)
    assert first.shape == (6, 384) and first.dtype == torch.float16
    assert torch.allclose(first.float(), expected, atol=2e-3)
    assert keys([ANSWERING])[0] is first, "a document asked about again is not encoded again"
    edited = keys([ANSWERING + " It has a ferry."])[0]
    assert edited.shape == (7, 384) and edited is not first, "an edited text is encoded anew"


def test_reranking_picks_the_document_whose_sentence_answers_over_a_better_pooled_key(minilm, bpe_tokenizer):
    plain, reranked = _modules(minilm, bpe_tokenizer, 0), _modules(minilm, bpe_tokenizer, 2)
    texts = [ANSWERING, NEAR]
    bank = _bank(plain, texts)
    q = plain.compressor.compress([QUESTION]).key  # (1, d_k)
    by_key = plain.select(q, bank, 1)
    assert by_key.indices.tolist() == [[1]], "the pooled key prefers the paragraph that answers nothing"

    chosen = reranked.select(q, bank, 1)
    assert chosen.indices.tolist() == [[0]]
    key_score = float(q[0] @ bank.keys[0])
    sentences = SentenceKeys(reranked.compressor.key_encoder)([ANSWERING])[0].float()  # (6, d_s)
    dense = torch.nn.functional.normalize(q[0, :384], dim=0)  # (d_s,)
    best = float((sentences @ dense).max())
    assert chosen.scores[0, 0].item() == pytest.approx(key_score + 0.3 * best, abs=1e-4)
    assert best == pytest.approx(float(sentences[-1] @ dense), abs=1e-6), "its last sentence answers"


def test_reranking_needs_the_banks_texts_and_a_key_encoder(minilm, bpe_tokenizer):
    modules = _modules(minilm, bpe_tokenizer, 2)
    bank = dataclasses.replace(_bank(modules, [ANSWERING, NEAR]), texts=[])
    with pytest.raises(InvalidInputError, match="Bank.texts"):
        modules.select(modules.compressor.compress([QUESTION]).key, bank, 1)
    base = small_cmt_config()  # no key encoder
    with pytest.raises(InvalidInputError, match="needs CompressorConfig.key_encoder"):
        CMTConfig(base.compressor, dataclasses.replace(base.aggregator, rerank_candidates=4), base.aligner)
    with pytest.raises(InvalidInputError, match="rerank_candidates must be an integer >= 0"):
        AggregatorConfig(rerank_candidates=-1)
    with pytest.raises(InvalidInputError, match="rerank_sentence_weight"):
        AggregatorConfig(rerank_sentence_weight=float("nan"))
