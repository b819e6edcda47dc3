from __future__ import annotations

import pytest
import torch

from service.errors import InvalidInputError
from service.models.aggregator import Selection, order_newest_first, select_recent, select_top_k, select_top_k_recent
from service.models.cmt import Bank, CMTPipeline
from service.models.llm import GenerationConfig
from tests.conftest import tiny_gpt2


def test_top_k_returns_planted_document_whose_key_matches_the_question():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(1000, 64, generator=g), dim=-1)  # (N, d)
    query = torch.nn.functional.normalize(bank[[417, 3]] + 0.05 * torch.randn(2, 64, generator=g), dim=-1)
    sel = select_top_k(query, bank, 5)
    assert sel.indices[:, 0].tolist() == [417, 3]
    assert (sel.scores[:, :-1] >= sel.scores[:, 1:]).all()


def test_bank_smaller_than_top_k_and_empty_bank():
    q = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    small = select_top_k(q, torch.nn.functional.normalize(torch.randn(2, 8), dim=-1), 5)
    assert small.indices.shape == (2, 2) and small.mask.all()
    empty = select_top_k(q, torch.empty(0, 8), 5)
    assert empty.indices.shape == (2, 0)


def test_newer_report_within_the_recency_margin_is_picked_before_a_better_scored_older_one():
    scores, times = [0.90, 0.88, 0.70, 0.89], [10.0, 30.0, 50.0, 20.0]
    assert select_recent(scores, times, 1, margin=0.0) == [0]
    assert select_recent(scores, times, 1, margin=0.05) == [1]  # 0.88 is within 0.05 of 0.90 and newest of those
    assert select_recent(scores, times, 3, margin=0.05) == [1, 3, 0]  # the 0.70 report is never close enough
    assert select_recent(scores, times, 9, margin=0.0) == [0, 3, 1, 2]


def test_select_top_k_recent_matches_the_rule_row_by_row_and_handles_an_empty_bank():
    g = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)  # (N, d)
    q = torch.nn.functional.normalize(bank[[4, 9]] + 0.3 * torch.randn(2, 16, generator=g), dim=-1)
    times = torch.rand(50, generator=g, dtype=torch.float64)
    sel = select_top_k_recent(q, bank, times, 2, margin=0.2)
    full = q @ bank.T  # (B, N)
    for b in range(2):
        pool = full[b].topk(8)
        expected = [
            pool.indices[j].item() for j in select_recent(pool.values.tolist(), times[pool.indices].tolist(), 2, 0.2)
        ]
        assert sel.indices[b].tolist() == expected
    assert torch.equal(select_top_k_recent(q, bank, times, 2, margin=0.0).indices, select_top_k(q, bank, 2).indices)
    assert select_top_k_recent(q, torch.empty(0, 16), torch.empty(0), 2, margin=0.2).indices.shape == (2, 0)


def test_order_newest_first_keeps_padding_last():
    sel = Selection(torch.tensor([[0, 2, -1]]), torch.tensor([[0.9, 0.8, float("-inf")]]))
    ordered = order_newest_first(sel, torch.tensor([10.0, 0.0, 30.0]))
    assert ordered.indices.tolist() == [[2, 0, -1]]


def test_swapping_two_documents_order_changes_m_star(make_modules, bpe_tokenizer):
    modules = make_modules(tiny_gpt2(bpe_tokenizer)).eval()
    docs = modules.compressor.compress(["It rained on 1 February.", "It snowed on 2 February."])
    q = modules.compressor.compress(["What was the weather?"])
    mask = torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        a = modules.aggregator(q.memory, docs.memory[[0, 1]][None], mask)
        b = modules.aggregator(q.memory, docs.memory[[1, 0]][None], mask)
    assert (a - b).abs().max() > 1e-4


def test_empty_bank_answers_without_prefix_exactly_like_the_bare_llm(make_modules, bpe_tokenizer):
    llm = tiny_gpt2(bpe_tokenizer)
    pipeline = CMTPipeline(make_modules(llm), llm)
    questions = ["Who won the match?", "When did the river flood?"]
    cfg = GenerationConfig(max_new_tokens=8)
    answers = pipeline.answer(questions, Bank.empty(4, 384), top_k=3, generation=cfg)
    bare = llm.generate(pipeline.prompts(questions), config=cfg)
    assert [a.generation.token_ids for a in answers] == [g.token_ids for g in bare]
    assert all(a.source_ids == [] for a in answers)


def test_pipeline_answers_from_a_bank_and_reports_sources(make_modules, bpe_tokenizer, paragraphs):
    llm = tiny_gpt2(bpe_tokenizer)
    pipeline = CMTPipeline(make_modules(llm), llm)
    docs = pipeline.compress(paragraphs[:5])
    bank = Bank(docs.memory, docs.key, torch.arange(5.0), [f"d{i}" for i in range(5)])
    answers = pipeline.answer([paragraphs[2][:80]], bank, top_k=3, generation=GenerationConfig(max_new_tokens=4))
    assert len(answers[0].source_ids) == 3 and set(answers[0].source_ids) <= set(bank.ids)
    assert answers[0].generation.token_ids  # the prefix changed nothing structural: tokens came out


def test_bad_aggregator_inputs_raise_clear_errors(make_modules, bpe_tokenizer):
    modules = make_modules(tiny_gpt2(bpe_tokenizer))
    with pytest.raises(InvalidInputError, match="top_k"):
        select_top_k(torch.randn(1, 8), torch.randn(3, 8), 0)
    with pytest.raises(InvalidInputError, match="floating point"):
        select_top_k(torch.ones(1, 8, dtype=torch.long), torch.randn(3, 8), 2)
    with pytest.raises(InvalidInputError, match="floating point"):
        modules.aggregator(
            torch.randn(1, 4, 384), torch.ones(1, 2, 4, 384, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool)
        )
    with pytest.raises(InvalidInputError, match="same d"):
        select_top_k(torch.randn(1, 8), torch.randn(3, 9), 2)
    with pytest.raises(InvalidInputError, match="shape mismatch"):
        modules.aggregator(torch.randn(1, 4, 384), torch.randn(1, 2, 4, 384), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(InvalidInputError, match="max_docs"):
        modules.aggregator(torch.randn(1, 4, 384), torch.randn(1, 9, 4, 384), torch.ones(1, 9, dtype=torch.bool))


def test_memories_queries_make_m_star_independent_of_the_question(make_modules, bpe_tokenizer):
    """queries="memories": M* is a function of the selected memories alone (no question shortcut to π)."""
    from dataclasses import replace

    modules = make_modules(tiny_gpt2(bpe_tokenizer)).eval()
    modules.aggregator.config = replace(modules.aggregator.config, queries="memories")
    docs = modules.compressor.compress(["It rained on 1 February.", "It snowed on 2 February."])
    q = modules.compressor.compress(["What was the weather?", "Who won the match?"])
    mask = torch.ones(2, 1, dtype=torch.bool)
    with torch.no_grad():
        same_doc = modules.aggregator(q.memory, docs.memory[[0, 0]][:, None], mask)  # (2, k, d_m)
        other_doc = modules.aggregator(q.memory, docs.memory[[0, 1]][:, None], mask)
    assert torch.allclose(same_doc[0], same_doc[1], atol=1e-6), "two questions, one document: one M*"
    assert (other_doc[0] - other_doc[1]).abs().max() > 1e-4, "another document gives another M*"
    with pytest.raises(InvalidInputError, match="queries"):
        replace(modules.aggregator.config, queries="both")
