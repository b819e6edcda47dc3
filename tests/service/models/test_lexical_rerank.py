"""BM25 over word pieces for the re-ranker's lexical stage (service.models.lexical_rerank), real MiniLM tokenizer."""

from __future__ import annotations

import pytest
import torch

from service.models.lexical_key import LexicalKey
from service.models.lexical_rerank import B_LENGTH, K1, CandidateTerms


@pytest.fixture()
def terms(minilm) -> CandidateTerms:
    _, tokenizer = minilm
    lexical = LexicalKey(len(tokenizer), 64, tokenizer.all_special_ids)
    with torch.no_grad():
        lexical.weight.copy_(torch.linspace(0.5, 2.0, len(tokenizer)))  # distinct weights per token
    return CandidateTerms(tokenizer, lexical, mean_tokens=8.0)


def _bm25(terms: CandidateTerms, question: str, text: str) -> float:
    """The textbook formula over the tokenizer's word pieces, for comparison."""
    q = set(terms.tokenizer(question, add_special_tokens=False)["input_ids"])
    ids = terms.tokenizer(text, add_special_tokens=False)["input_ids"]
    norm = K1 * (1 - B_LENGTH + B_LENGTH * len(ids) / terms.mean_tokens)
    return sum(float(terms.lexical_key.weight[t].detach()) * ids.count(t) * (K1 + 1) / (ids.count(t) + norm)
               for t in set(ids) & q)


def test_scores_are_bm25_over_word_pieces_divided_by_the_best_candidates(terms):
    question = "Where does the Rhine flow?"
    texts = ["The Rhine flows north. The Rhine is long.", "A river runs where the hills are.",
             "Nothing in common here."]
    raw = [_bm25(terms, question, t) for t in texts]
    assert raw[0] > raw[1] > 0 == raw[2]
    scores = terms.scores([question], [texts])  # (1, 3)
    assert scores[0].tolist() == pytest.approx([1.0, raw[1] / raw[0], 0.0], rel=1e-5)


def test_padding_and_questions_matching_nothing_score_zero_and_texts_are_counted_once(terms):
    texts = ["The Rhine flows north.", "Basel lies on the Rhine."]
    scores = terms.scores(["Rhine?", "zzzz qqqq"], [[texts[0], None], [texts[1], texts[0]]])  # (2, 2)
    assert scores[0, 1] == 0 and scores[0, 0] == pytest.approx(1.0)
    assert scores[1].tolist() == [0.0, 0.0], "no shared word piece: no lexical evidence, no division by zero"
    cached = terms.term_counts([texts[0]])[0]
    assert terms.term_counts([texts[0]])[0] is cached, "a text seen again is not tokenized again"


def test_the_lexical_keys_weights_are_read_at_each_call(terms):
    """A checkpoint loaded into the lexical key after the re-ranker was built is what scores."""
    question, texts = "Rhine Basel", ["Rhine Rhine Rhine.", "Basel."]
    before = terms.scores([question], [texts])
    basel = terms.tokenizer("Basel", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        terms.lexical_key.weight[basel] = 100.0
    after = terms.scores([question], [texts])
    assert before[0, 0] == pytest.approx(1.0) and after[0, 1] == pytest.approx(1.0)
