"""The re-ranker (AggregatorConfig.rerank_*): sentences, and word pieces then sentences, with the real MiniLM as the key
encoder."""

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


def _modules(minilm, bpe_tokenizer, rerank_candidates: int, **rerank) -> CMTModules:
    base = small_cmt_config(key_encoder=DEFAULT_BACKBONE, key_dim=1024, lexical_key_weight=1.2)
    aggregator = dataclasses.replace(base.aggregator, rerank_candidates=rerank_candidates, **rerank)
    config = CMTConfig(base.compressor, aggregator, base.aligner)
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
    by_key = plain.select([QUESTION], q, bank, 1)
    assert by_key.indices.tolist() == [[1]], "the pooled key prefers the paragraph that answers nothing"

    chosen = reranked.select([QUESTION], q, bank, 1)
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
        modules.select([QUESTION], modules.compressor.compress([QUESTION]).key, bank, 1)
    base = small_cmt_config()  # no key encoder
    with pytest.raises(InvalidInputError, match="needs CompressorConfig.key_encoder"):
        CMTConfig(base.compressor, dataclasses.replace(base.aggregator, rerank_candidates=4), base.aligner)
    with pytest.raises(InvalidInputError, match="rerank_candidates must be an integer >= 0"):
        AggregatorConfig(rerank_candidates=-1)
    with pytest.raises(InvalidInputError, match="rerank_sentence_weight"):
        AggregatorConfig(rerank_sentence_weight=float("nan"))
    with pytest.raises(InvalidInputError, match="rerank_lexical_weight"):
        AggregatorConfig(rerank_lexical_weight=-0.1)
    with pytest.raises(InvalidInputError, match="rerank_sentence_candidates"):
        AggregatorConfig(rerank_sentence_candidates=-1)
    with pytest.raises(InvalidInputError, match="rerank_lexical_mean_tokens"):
        AggregatorConfig(rerank_lexical_mean_tokens=0)
    unweighted = small_cmt_config(key_encoder=DEFAULT_BACKBONE, key_dim=1024, lexical_key_weight=0.0)
    with pytest.raises(InvalidInputError, match="rerank_lexical_weight needs CompressorConfig.lexical_key_weight"):
        CMTConfig(unweighted.compressor, dataclasses.replace(unweighted.aggregator, rerank_candidates=4,
                                                             rerank_lexical_weight=0.1), unweighted.aligner)


def test_lexical_stage_adds_the_normalised_bm25_and_only_the_best_c2_get_the_sentence_term(minilm, bpe_tokenizer):
    question = "Who founded Vintrova?"
    founding = "Vintrova was founded by Ada Lind. Vintrova grew fast. Vintrova now employs 400 people."
    other = "Vintrova is a name. Many towns have rivers and bridges and old churches and markets."
    modules = _modules(minilm, bpe_tokenizer, 2, rerank_lexical_weight=0.5, rerank_sentence_candidates=1,
                       rerank_sentence_weight=0.3)
    bank = _bank(modules, [other, founding])
    q = modules.compressor.compress([question]).key  # (1, d_k)
    key_scores = (q @ bank.keys.T)[0]  # (2,)
    scores = modules.reranker([question], q, key_scores[None], [[other, founding]])  # (1, 2)
    lexical = modules.reranker.terms.scores([question], [[other, founding]])  # (1, 2)
    assert lexical[0, 1] == pytest.approx(1.0) and 0 < lexical[0, 0] < 1, "the best candidate's BM25 is the unit"
    staged = key_scores + 0.5 * lexical[0]  # (2,)
    first = int(staged.argmax())
    sentences = modules.reranker.sentence_keys([[other, founding][first]])[0].float()  # (S, d_s)
    best = float((sentences @ torch.nn.functional.normalize(q[0, :384], dim=0)).max().clamp(min=0))
    assert scores[0, first].item() == pytest.approx(staged[first].item() + 0.3 * best, abs=1e-4)
    assert scores[0, 1 - first].item() == pytest.approx(staged[1 - first].item(), abs=1e-5), \
        "only the best S = 1 gets the sentence term"
    assert modules.select([question], q, bank, 1).indices.tolist() == [[1]]
