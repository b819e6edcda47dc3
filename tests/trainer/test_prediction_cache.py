"""The prediction cache of the prompt-only evaluation rows, on real tiny models (no mocks): a second
evaluation computes no prompt-only answer again and gives identical rows; another profile, other
generation settings or other LLM weights are other entries."""

from __future__ import annotations

import dataclasses

import pytest

from service.errors import InvalidInputError
from service.models.llm import GenerationConfig, HFCausalLM
from service.models.prompts import PromptProfile, get_profile
from tests.conftest import tiny_gpt2
from trainer.data import SyntheticConfig, synthetic_stream
from trainer.eval_answer import generation_config, prompt_text, run_prompts
from trainer.evaluate import run_evaluation
from trainer.prediction_cache import PredictionCache, llm_weights_digest

STREAM = SyntheticConfig(seed=3, num_entities=40, kinds=("city", "staff"), pool_size=6, fillers=0)
PROMPT_ONLY = ("baseline", "rag")
# fewshot's worked examples alone fill the tiny GPT-2's 256 positions: another short profile
TERSE = PromptProfile(name="terse", question_template="Q: {question}\nA:",
                      context_template="{context}\nQ: {question}\nA:")


class CountingLLM(HFCausalLM):
    """The real tiny LLM, counting the prompts it answers without a memory prefix."""

    prompt_only = 0

    def generate(self, prompts, prefix=None, prefix_mask=None, config=GenerationConfig()):
        if prefix is None:
            self.prompt_only += len(prompts)
        return super().generate(prompts, prefix, prefix_mask, config)


def _evaluate(llm, ckpt, docs, cache_dir, **kw):
    # timing_questions=0: no timing pass (it answers a sample again on purpose, without the cache)
    return run_evaluation(llm, ckpt, docs, max_questions=16, retention_docs=0, robustness_questions=0,
                          cache_dir=cache_dir, batch_size=8, progress=False, timing_questions=0, **kw)


ANEW = {"seconds_per_question", "retrieval_seconds_per_question", "seconds_when_answered_per_question",
        "generation_seconds_per_question", "computed", "cached", "timing"}


def _comparable(row):
    """A row without what is measured or counted anew on every run (seconds, cache counts)."""
    return {k: v for k, v in row.items() if k not in ANEW}


def test_second_evaluation_computes_nothing_again_and_a_new_profile_does(tmp_path, model_dirs):
    llm_dir, ckpt = model_dirs
    docs = synthetic_stream(STREAM)["train"]
    cache_dir = tmp_path / "cache"

    llm = CountingLLM.from_pretrained(str(llm_dir))
    first = _evaluate(llm, ckpt, docs, cache_dir)
    rows = {r["row"]: r for r in first["rows"]}
    computed = sum(r["computed"] for r in first["rows"] if r["family"] in PROMPT_ONLY)
    assert llm.prompt_only == first["cache"]["misses"] == computed > 0, "every distinct prompt is generated once"
    assert rows["RAG top-1 by BM25"]["cached"] > 0, "a RAG prompt equal to the gold prompt is not recomputed"
    assert computed < sum(r["n"] for r in first["rows"] if r["family"] in PROMPT_ONLY)

    again = CountingLLM.from_pretrained(str(llm_dir))  # a new process would load the LLM anew
    second = _evaluate(again, ckpt, docs, cache_dir)
    assert again.prompt_only == 0 and second["cache"]["misses"] == 0 and second["cache"]["hits"] > 0
    assert [_comparable(r) for r in second["rows"]] == [_comparable(r) for r in first["rows"]]
    assert all(r["computed"] == 0 for r in second["rows"] if r["family"] in PROMPT_ONLY)
    assert [r["seconds_when_answered_per_question"] for r in second["rows"] if r["family"] in PROMPT_ONLY] == [
        r["seconds_when_answered_per_question"] for r in first["rows"] if r["family"] in PROMPT_ONLY
    ], "kept with the answers"

    other = CountingLLM.from_pretrained(str(llm_dir))
    third = _evaluate(other, ckpt, docs, cache_dir, prompt_profile=TERSE)
    assert third["prompt_profile"] == "terse" and third["checkpoint_prompt_profile"] == "plain"
    assert other.prompt_only > 0 and third["cache"]["misses"] == other.prompt_only
    cmt = [r for r in third["rows"] if r["family"] == "cmt"]
    assert cmt and all(r["profile"] == "plain" for r in cmt), "CMT rows keep the checkpoint's profile"
    assert [_comparable(r) for r in third["rows"] if r["family"] == "cmt"] == [
        _comparable(r) for r in first["rows"] if r["family"] == "cmt"]


def test_cache_key_holds_profile_generation_and_weights(tmp_path, bpe_tokenizer):
    llm = tiny_gpt2(bpe_tokenizer, seed=0)
    plain = get_profile("plain")
    stops = dataclasses.replace(plain, name="plain-stop-at-period", stop_strings=("\n", "."))
    prompt = prompt_text(llm, plain, "Where is the Rhine?")
    assert prompt == prompt_text(llm, stops, "Where is the Rhine?"), "same text, other profile"

    cache = PredictionCache(tmp_path, llm, plain, generation_config(profile=plain))
    run = run_prompts(llm, [prompt, prompt], cache)
    assert (run.fresh, run.cached, cache.misses) == (1, 0, 1), "a prompt asked twice is generated once"
    cache.close()

    reopened = PredictionCache(tmp_path, llm, plain, generation_config(profile=plain))
    again = run_prompts(llm, [prompt], reopened)
    assert (again.fresh, again.cached, again.predictions) == (0, 1, run.predictions[:1])
    assert again.seconds == run.seconds[:1], "the measured seconds are kept with the answer"

    for other in (
        PredictionCache(tmp_path, llm, stops, generation_config(profile=stops)),
        PredictionCache(tmp_path, llm, plain, generation_config(max_new_tokens=4, profile=plain)),
        PredictionCache(tmp_path, tiny_gpt2(bpe_tokenizer, seed=1), plain, generation_config(profile=plain)),
    ):
        assert other.get(prompt) is None and other.misses == 1


def test_weights_digest_tells_llms_of_one_config_apart(bpe_tokenizer):
    a, b = tiny_gpt2(bpe_tokenizer, seed=0), tiny_gpt2(bpe_tokenizer, seed=1)
    assert a.identity.fingerprint == b.identity.fingerprint, "the checkpoint fingerprint ignores weights"
    assert llm_weights_digest(a) != llm_weights_digest(b)
    assert llm_weights_digest(a) == llm_weights_digest(tiny_gpt2(bpe_tokenizer, seed=0))


def test_a_profile_too_long_for_the_llm_is_refused_clearly(bpe_tokenizer):
    llm = tiny_gpt2(bpe_tokenizer)  # 256 positions; fewshot's examples take ~240 tokens of this tokenizer
    question = ("Which cities along the river Rhine between Basel and Rotterdam were named in the report of the "
                "committee?")
    with pytest.raises(InvalidInputError, match="'fewshot'.*positions"):
        prompt_text(llm, get_profile("fewshot"), question, ["Basel is on the Rhine. " * 20])
    assert prompt_text(llm, get_profile("plain"), question, ["Basel is on the Rhine. " * 80]), \
        "plain fits: the document is cut"


@pytest.mark.parametrize("profile", [get_profile("plain"), TERSE])
def test_cached_answers_equal_fresh_ones(tmp_path, bpe_tokenizer, profile):
    llm = tiny_gpt2(bpe_tokenizer)
    p = profile
    prompts = [prompt_text(llm, p, q, d) for q, d in [("Who won?", None), ("Where?", ["Basel is on the Rhine."])]]
    fresh = run_prompts(llm, prompts, PredictionCache(None, llm, p, generation_config(profile=p)), batch_size=1)
    cached = PredictionCache(tmp_path, llm, p, generation_config(profile=p))
    run_prompts(llm, prompts, cached, batch_size=2)
    assert run_prompts(llm, prompts, cached).predictions == fresh.predictions
