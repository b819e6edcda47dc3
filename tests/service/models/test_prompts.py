from __future__ import annotations

import pytest

from service.errors import InvalidInputError
from service.models.prompts import PROFILES, PromptProfile, ShotExample, get_profile


def test_fewshot_prompts_show_each_shot_with_its_answer_then_the_question():
    p = PROFILES["fewshot"]
    q = p.question_prompt("Who won?")
    assert q.endswith("Question: Who won?\nAnswer:") and q.count("Question:") == 3 and "Answer: 1889" in q
    assert "Context:" not in q, "a question alone shows the shots without their paragraphs"
    c = p.context_prompt("Who won?", ["Ann won.", "Bob lost."])
    assert c.endswith("Context: Ann won.\nBob lost.\nQuestion: Who won?\nAnswer:") and c.count("Context:") == 3


def test_fewshot_context_profile_keeps_the_question_prompt_short():
    p = PROFILES["fewshot-context"]
    assert p.question_prompt("Who won?") == "Question: Who won?\nAnswer:"
    assert p.context_prompt("Who won?", ["Ann won."]).count("Answer:") == 3


def test_profiles_round_trip_through_a_checkpoint_dict():
    for p in PROFILES.values():
        assert PromptProfile.from_dict(p.to_dict()) == p
    assert get_profile(None).name == "plain" and get_profile("fewshot") is PROFILES["fewshot"]


def test_chat_profile_wraps_the_prompt_in_the_tokenizers_template(bpe_tokenizer):
    with pytest.raises(InvalidInputError, match="chat template"):
        PROFILES["chat"].question_text(bpe_tokenizer, "Who?")
    assert PROFILES["fewshot"].question_text(bpe_tokenizer, "Who?") == PROFILES["fewshot"].question_prompt("Who?")


def test_bad_profiles_are_refused_with_the_missing_placeholder():
    with pytest.raises(InvalidInputError, match="unknown prompt profile"):
        get_profile("nope")
    with pytest.raises(InvalidInputError, match="question"):
        PromptProfile(name="x", question_template="Q:")
    with pytest.raises(InvalidInputError, match="context"):
        PromptProfile(name="x", context_template="{question}", shots=(ShotExample("q", "a"),))
