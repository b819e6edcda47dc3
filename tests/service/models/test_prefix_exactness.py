"""An LLM's own KV of a context, fed as the prefix, must reproduce in-context results exactly."""

from __future__ import annotations

import inspect
import warnings

import torch
from transformers import DynamicCache

from service.models.llm import GenerationConfig, HFCausalLM
from service.models.prefix import KVPrefix

QUESTIONS = [
    "Question: who built the bridge?\nAnswer:",
    "Where?",
    "Question: in which year did it open to the public?\nAnswer:",
]


def own_kv(llm: HFCausalLM, context: torch.Tensor) -> KVPrefix:
    """The LLM's KV cache of `context` (B, p) as a detached prefix."""
    cache = DynamicCache(config=llm.model.config)
    with torch.no_grad():
        llm.model(input_ids=context, use_cache=True, **{llm.cache_arg: cache})
    prefix = KVPrefix.from_cache(cache)
    return KVPrefix([k.clone() for k in prefix.keys], [v.clone() for v in prefix.values])


def contexts(llm: HFCausalLM, B: int, p: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, len(llm.tokenizer), (B, p), generator=g)  # (B, p)


def test_own_kv_prefix_reproduces_in_context_logits_batched_with_left_padding(llm):
    ctx = contexts(llm, len(QUESTIONS))
    ids, mask = llm.encode(QUESTIONS)  # left padded, different lengths
    assert (mask == 0).any(), "the batch must exercise left padding"
    with torch.no_grad():
        got = llm.forward_logits(ids, mask, own_kv(llm, ctx))  # (B, n, V)
    for b in range(len(QUESTIONS)):
        q = ids[b][mask[b].bool()]
        with torch.no_grad():
            ref = llm.model(input_ids=torch.cat([ctx[b], q])[None]).logits[0, ctx.shape[1] :]
        diff = (got[b, -len(q) :] - ref).abs().max().item()
        assert diff <= 1e-4, f"row {b}: max abs diff {diff}"


def test_own_kv_prefix_reproduces_in_context_greedy_generation(llm):
    ctx = contexts(llm, len(QUESTIONS))
    gens = llm.generate(QUESTIONS, own_kv(llm, ctx), config=GenerationConfig(max_new_tokens=12))
    eos = llm.tokenizer.eos_token_id
    for b, gen in enumerate(gens):
        q = torch.tensor(llm.tokenizer(QUESTIONS[b])["input_ids"])
        full = torch.cat([ctx[b], q])[None]
        ref = llm.model.generate(
            input_ids=full, attention_mask=torch.ones_like(full), max_new_tokens=12, do_sample=False,
            pad_token_id=llm.tokenizer.pad_token_id,
        )[0, full.shape[1] :].tolist()
        ref = ref[: ref.index(eos)] if eos in ref else ref
        assert gen.token_ids == ref, f"row {b}"


def test_masked_prefix_row_equals_no_prefix(llm):
    ctx = contexts(llm, len(QUESTIONS))
    ids, mask = llm.encode(QUESTIONS)
    off = torch.tensor([False, True, False])
    with torch.no_grad():
        with_prefix = llm.forward_logits(ids, mask, own_kv(llm, ctx), prefix_mask=off.logical_not())
        bare = llm.forward_logits(ids, mask)
    m = mask.bool()
    assert (with_prefix[1][m[1]] - bare[1][m[1]]).abs().max() <= 1e-4
    assert (with_prefix[0][m[0]] - bare[0][m[0]]).abs().max() > 1e-3, "an unmasked prefix must matter"


def test_memory_aware_decoding_with_zero_alpha_equals_plain_and_alpha_changes_logits(llm):
    ctx = contexts(llm, len(QUESTIONS))
    prefix = own_kv(llm, ctx)
    plain = llm.generate(QUESTIONS, prefix, config=GenerationConfig(max_new_tokens=6))
    zero = llm.generate(QUESTIONS, prefix, config=GenerationConfig(max_new_tokens=6, alpha=0.0))
    assert [g.token_ids for g in plain] == [g.token_ids for g in zero]
    # With α the first step's logits are (1+α)·l_mem − α·l_bare: check against the two passes.
    ids, mask = llm.encode(QUESTIONS)
    with torch.no_grad():
        mem = llm.forward_logits(ids, mask, prefix)[:, -1]
        bare = llm.forward_logits(ids, mask)[:, -1]
    expected = ((1 + 3.0) * mem - 3.0 * bare).argmax(-1)
    first = next(llm.stream(QUESTIONS, prefix, config=GenerationConfig(max_new_tokens=1, alpha=3.0)))
    assert first.tolist() == expected.tolist()


def test_sampling_is_reproducible_with_seed_and_stop_strings_cut_the_answer(llm):
    cfg = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    a = llm.generate(QUESTIONS, config=cfg)
    b = llm.generate(QUESTIONS, config=cfg)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    first_text = llm.generate(QUESTIONS[:1], config=GenerationConfig(max_new_tokens=10))[0]
    assert len(first_text.text) > 2
    stop = first_text.text[1:3]
    cut = llm.generate(QUESTIONS[:1], config=GenerationConfig(max_new_tokens=10, stop_strings=(stop,)))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text


def test_vanishing_temperature_samples_like_greedy_instead_of_crashing(llm):
    greedy = llm.generate(QUESTIONS, config=GenerationConfig(max_new_tokens=5))
    cold = llm.generate(
        QUESTIONS, config=GenerationConfig(max_new_tokens=5, do_sample=True, temperature=5e-324, seed=0)
    )
    assert [g.token_ids for g in cold] == [g.token_ids for g in greedy]


def test_prefix_from_embeddings_of_real_tokens_reproduces_in_context_logits(llm):
    """The "embeddings" aligner's path: the LLM's own K/V of input embeddings; fed the context's token
    embeddings, it must give the in-context logits exactly (GPT-2 and Llama/GQA fixtures)."""
    ctx = contexts(llm, len(QUESTIONS))
    ids, mask = llm.encode(QUESTIONS)
    with torch.no_grad():
        prefix = llm.prefix_from_embeddings(llm.model.get_input_embeddings()(ctx))  # p = 9 positions
        got = llm.forward_logits(ids, mask, prefix)  # (B, n, V)
    for b in range(len(QUESTIONS)):
        q = ids[b][mask[b].bool()]
        with torch.no_grad():
            ref = llm.model(input_ids=torch.cat([ctx[b], q])[None]).logits[0, ctx.shape[1] :]
        assert (got[b, -len(q) :] - ref).abs().max().item() <= 1e-4, f"row {b}"


def test_the_hf_backend_implements_the_serving_interface(llm):
    from service.models.llm import LLMBackend

    assert isinstance(llm, LLMBackend), "the engine and CMTPipeline are typed against LLMBackend"


def test_every_forward_passes_the_cache_by_the_installed_transformers_own_name(llm):
    """transformers renamed forward's `past_key_values` to `cache`; the old name is a deprecated alias (a
    FutureWarning, and gone in 5.40). Prefill, memory-aware decoding and the embeddings prefix must not use it."""
    assert llm.cache_arg in inspect.signature(llm.model.forward).parameters
    prefix = own_kv(llm, contexts(llm, len(QUESTIONS)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        answers = llm.generate(QUESTIONS, prefix, config=GenerationConfig(max_new_tokens=3, alpha=0.5))
        embeddings = llm.model.get_input_embeddings()(contexts(llm, 1))  # (1, p, d)
        from_embeddings = llm.prefix_from_embeddings(embeddings)
    assert len(answers) == len(QUESTIONS)
    assert from_embeddings.keys[0].shape[2] == embeddings.shape[1]
