"""ψ's slot selection (AggregatorConfig.select_slots): the question chooses which stored slots the LLM reads."""

from __future__ import annotations

import pytest
import torch

from service.errors import InvalidInputError
from service.models.config import AggregatorConfig, CMTConfig, CompressorConfig
from service.models.slot_select import (
    case_forms,
    question_token_ids,
    question_tokens,
    read_slots,
    select_slots,
    slot_scores,
)

V = 50
SALIENCE = torch.linspace(0.0, 9.8, V)  # token t has salience 0.2·t: low ids are "the", "what"


def _one_doc(tokens: list[int], m: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A document whose slot j holds token tokens[j] (weight 1) and a filler of weight 0: (1, 1, k, m)."""
    ids = torch.zeros(1, 1, len(tokens), m, dtype=torch.long)
    ids[0, 0, :, 0] = torch.tensor(tokens)
    weights = torch.zeros(1, 1, len(tokens), m, dtype=torch.float16)
    weights[0, 0, :, 0] = 1.0
    return ids, weights


def test_the_slots_around_a_salient_question_token_are_read_in_text_order():
    doc = [20, 21, 22, 23, 24, 45, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34]  # 45 at slot 5 is asked
    ids, weights = _one_doc(doc)
    asked = question_tokens([[1, 45]], SALIENCE, min_salience=2.0)  # token 1 is too common to look for
    assert asked[0].nonzero().flatten().tolist() == [45]
    slots = select_slots(slot_scores(asked, ids, weights, SALIENCE, width=2.0, own_weight=0.0), 5)  # (1, 5)
    assert slots[0].tolist() == [3, 4, 5, 6, 7]


def test_without_a_match_the_most_salient_slots_are_read():
    ids, weights = _one_doc([5, 40, 6, 41, 7, 42])
    asked = question_tokens([[]], SALIENCE, min_salience=2.0)
    slots = select_slots(slot_scores(asked, ids, weights, SALIENCE, width=4.0, own_weight=0.3), 3)
    assert slots[0].tolist() == [1, 3, 5]


def test_a_run_of_slots_on_the_same_token_counts_once():
    ids, weights = _one_doc([44, 44, 44, 10, 11, 12])  # a short text repeats its salient token across slots
    asked = question_tokens([[44]], SALIENCE, min_salience=2.0)
    slots = select_slots(slot_scores(asked, ids, weights, SALIENCE, width=1.0, own_weight=0.3), 3)
    assert slots[0].tolist() == [0, 3, 4]


def test_spaced_slots_read_a_number_with_a_repeated_digit_whole():
    # "2003" is four one-digit tokens (31 = "0"); a short text spread over 12 slots: 45 and 33 cover two each
    doc = [45, 45, 30, 31, 31, 33, 33, 10, 11, 12, 12, 13]
    ids, weights = _one_doc(doc)
    asked = question_tokens([[45]], SALIENCE, min_salience=2.0)
    distinct = slot_scores(asked, ids, weights, SALIENCE, width=2.0, own_weight=0.0)
    assert select_slots(distinct, 5)[0].tolist() == [0, 2, 3, 5, 7]  # "… 203": both runs collapse
    weights[0, 0, [1, 6, 10], 0] = 0  # "spaced": the slots continuing 45, 33 and 12 say so
    spaced = slot_scores(asked, ids, weights, SALIENCE, width=2.0, own_weight=0.0, spaced=True)
    assert select_slots(spaced, 5)[0].tolist() == [0, 2, 3, 4, 5]  # "… 2003" whole
    # every other slot scores as under "distinct": a continuation slot still pulls as its token
    same = torch.ones(len(doc), dtype=torch.bool)
    same[4] = False
    torch.testing.assert_close(spaced[0, 0, same], distinct[0, 0, same])


def test_summed_pull_prefers_the_stretch_holding_more_of_the_question_over_one_rarer_match():
    # slot 2 holds the question's rarest token (salience 9.8) alone; slots 10, 12, 14 hold three others (6.0-6.4)
    doc = [5, 6, 49, 7, 8, 9, 10, 11, 12, 13, 30, 14, 31, 15, 32, 16]
    ids, weights = _one_doc(doc)
    asked = question_tokens([[49, 30, 31, 32]], SALIENCE, min_salience=2.0)
    nearest = select_slots(slot_scores(asked, ids, weights, SALIENCE, width=4.0, own_weight=0.0), 1)
    summed = select_slots(slot_scores(asked, ids, weights, SALIENCE, width=4.0, own_weight=0.0, pull="sum"), 1)
    assert nearest[0].tolist() == [2]  # the single strongest match
    assert summed[0].tolist() == [12]  # amid the three: each of them pulls on it


def test_slot_selection_settings_are_checked():
    pooled = CompressorConfig(memory_values="token_embeddings", num_memory_tokens=8, stored_picks=4)
    with pytest.raises(InvalidInputError, match='queries="memories"'):
        AggregatorConfig(select_slots=4)
    with pytest.raises(InvalidInputError, match="stored_picks"):
        CMTConfig(CompressorConfig(num_memory_tokens=8), AggregatorConfig(select_slots=4, queries="memories"))
    with pytest.raises(InvalidInputError, match="exceeds the 8 stored slots"):
        CMTConfig(pooled, AggregatorConfig(select_slots=9, queries="memories"))
    with pytest.raises(InvalidInputError, match="stored_picks needs"):
        CompressorConfig(stored_picks=4)
    with pytest.raises(InvalidInputError, match="select_pull"):
        AggregatorConfig(select_pull="max")
    spaced = CompressorConfig(memory_values="token_embeddings", num_memory_tokens=8, stored_picks=1,
                              pick_rule="spaced")
    with pytest.raises(InvalidInputError, match='"spaced" needs AggregatorConfig.select_slots'):
        CMTConfig(spaced, AggregatorConfig(queries="memories"))
    assert CMTConfig(spaced, AggregatorConfig(select_slots=4, queries="memories")).slots_read == 4
    assert CMTConfig(pooled, AggregatorConfig(select_slots=4, queries="memories")).slots_read == 4
    assert CMTConfig(pooled).slots_read == 8


def test_with_several_documents_the_best_slots_among_all_of_them_are_read_as_one_memory():
    ids_a, w_a = _one_doc([20, 21, 22, 23, 24, 25])  # asks nothing
    ids_b, w_b = _one_doc([26, 27, 45, 28, 29, 30])  # holds the asked token 45 at slot 2
    ids, weights = torch.cat([ids_a, ids_b], dim=1), torch.cat([w_a, w_b], dim=1)  # (1, 2, 6, 2)
    asked = question_tokens([[45]], SALIENCE, min_salience=2.0)
    scores = slot_scores(asked, ids, weights, SALIENCE, width=1.0, own_weight=0.0)  # (1, 2, 6)
    slots = select_slots(scores, 3, torch.tensor([[True, True]]))
    assert slots[0].tolist() == [6 + 1, 6 + 2, 6 + 3]  # document b's slots 1-3, as indices into 2·6
    assert select_slots(scores, 3, torch.tensor([[True, False]]))[0].max() < 6, "padding is never read"
    memories = torch.arange(2 * 6, dtype=torch.float32).view(1, 2, 6, 1).expand(-1, -1, -1, 4)  # (1, 2, 6, 4)
    chosen, mask = read_slots(memories, torch.tensor([[True, True]]), slots)
    assert chosen.shape == (1, 1, 3, 4) and chosen[0, 0, :, 0].tolist() == [7.0, 8.0, 9.0] and mask.tolist() == [[True]]


def test_only_a_question_typed_without_capitals_is_also_read_capitalised():
    assert case_forms("who designed new earswick?") == ["who designed new earswick?", "Who Designed New Earswick?"]
    assert case_forms("is o'neil in 2003 x-ray?") == ["is o'neil in 2003 x-ray?", "Is O'Neil In 2003 X-Ray?"]
    assert case_forms("élan école") == ["élan école", "Élan École"]
    assert case_forms("2003?") == ["2003?"]
    assert case_forms("What did the Rhine carry?") == ["What did the Rhine carry?"]  # cased by its writer


def test_a_question_typed_in_lower_case_reads_the_slots_of_the_capitalised_name(bpe_tokenizer):
    before, name, after = "The garden city was planned in the north by", " Raymond Unwin", ", an architect of York."
    doc = bpe_tokenizer(before + name + after, add_special_tokens=False)["input_ids"]
    named = len(bpe_tokenizer(before, add_special_tokens=False)["input_ids"])
    span = list(range(named, named + len(bpe_tokenizer(name, add_special_tokens=False)["input_ids"])))
    assert bpe_tokenizer(before + name, add_special_tokens=False)["input_ids"][named:] == [doc[j] for j in span]
    ids, weights = _one_doc(doc)
    salience = torch.full((len(bpe_tokenizer),), 5.0)  # every token worth looking for
    question = ["who was raymond unwin"]
    chosen = {}
    for forms in (False, True):
        asked = question_tokens(question_token_ids(bpe_tokenizer, question, forms), salience, min_salience=2.0)
        assert bool(asked[0, [doc[j] for j in span]].all()) is forms  # the name's tokens as the text writes them
        scores = slot_scores(asked, ids, weights, salience, width=1.0, own_weight=0.0, pull="sum")
        chosen[forms] = select_slots(scores, len(span))[0].tolist()
    assert chosen[True] == span
    assert chosen[False] != span


def test_case_forms_are_off_unless_the_config_asks_and_must_be_a_boolean():
    assert AggregatorConfig().select_case_forms is False
    with pytest.raises(InvalidInputError, match="select_case_forms"):
        AggregatorConfig(select_case_forms="yes")
