from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from service.errors import InvalidInputError
from service.models.aligner import Aligner
from service.models.config import AlignerConfig
from service.models.prefix import KVLayout, KVPrefix


def test_prefix_shapes_follow_the_llm_including_grouped_query_attention(llm):
    aligner = Aligner(AlignerConfig(prefix_len=6, hidden_dim=32), llm.layout, memory_dim=384, num_memory_tokens=4)
    prefix = aligner(torch.randn(3, 4, 384))
    cfg = llm.model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    assert len(prefix.keys) == cfg.num_hidden_layers
    assert prefix.keys[0].shape == (3, kv_heads, 6, cfg.hidden_size // cfg.num_attention_heads)
    prefix.check_layout(llm.layout)


def test_aligner_for_a_llama2_7b_shaped_llm_stays_small():
    layout = KVLayout.from_config(
        LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    )
    n = Aligner.num_parameters_for(AlignerConfig(), layout, memory_dim=384, num_memory_tokens=16)
    dense = layout.num_layers * 384 * 2 * 4096  # a dense per-layer map would cost this
    assert n < 6_000_000 < dense


def test_bad_m_star_and_mismatched_prefix_are_refused(llm):
    aligner = Aligner(AlignerConfig(prefix_len=4, hidden_dim=16), llm.layout, 384, 4)
    with pytest.raises(InvalidInputError, match="M\\*"):
        aligner(torch.randn(2, 5, 384))
    with pytest.raises(InvalidInputError, match="float"):
        aligner(torch.ones(2, 4, 384, dtype=torch.int64))
    with pytest.raises(InvalidInputError, match="one shape"):
        KVPrefix([torch.randn(1, 2, 3, 4)], [torch.randn(1, 2, 3, 5)])
    wrong = KVPrefix(
        [torch.randn(1, 7, 2, 16)] * llm.layout.num_layers, [torch.randn(1, 7, 2, 16)] * llm.layout.num_layers
    )
    with pytest.raises(InvalidInputError, match="kv heads"):
        wrong.check_layout(llm.layout)


def test_embeddings_aligner_prefix_comes_from_the_llm_and_trains_through_it(llm):
    aligner = Aligner(
        AlignerConfig(prefix_len=5, hidden_dim=32, mode="embeddings"), llm.layout, memory_dim=384, num_memory_tokens=4
    )
    m_star = torch.randn(2, 4, 384)
    with pytest.raises(InvalidInputError, match="needs the frozen LLM"):
        aligner(m_star)
    prefix = aligner(m_star, llm)
    prefix.check_layout(llm.layout)
    assert prefix.keys[0].shape[0] == 2 and prefix.length == 5
    ids, mask = llm.encode(["Question: what?\nAnswer:", "Why?"])
    llm.forward_logits(ids, mask, prefix).sum().backward()
    assert aligner.up_proj.weight.grad is not None and aligner.up_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in llm.model.parameters()), "the LLM stays frozen"


def test_unknown_aligner_mode_is_refused():
    with pytest.raises(InvalidInputError, match="mode"):
        AlignerConfig(mode="adapter")


def test_embeddings_get_the_scale_of_a_real_token_whatever_the_memory_scale(llm):
    class Reader:  # the real LLM, remembering the embeddings π hands it
        def prefix_from_embeddings(self, embeddings):
            self.seen = embeddings
            return llm.prefix_from_embeddings(embeddings)

    reader = Reader()
    config = AlignerConfig(prefix_len=5, hidden_dim=32, mode="embeddings", output_rms=0.13)
    aligner = Aligner(config, llm.layout, memory_dim=384, num_memory_tokens=4)
    for scale in (1e-3, 1.0, 1e3):
        aligner(scale * torch.randn(2, 4, 384), reader)
        rms = reader.seen.pow(2).mean(-1).sqrt()  # (B, p)
        assert torch.allclose(rms, torch.full_like(rms, 0.13), rtol=1e-3)
    with pytest.raises(InvalidInputError, match="output_rms"):
        AlignerConfig(output_rms=-1.0)
