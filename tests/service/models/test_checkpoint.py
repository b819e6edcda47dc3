from __future__ import annotations

import json

import pytest
import torch

from service.errors import CheckpointError, CheckpointMismatchError
from service.models.checkpoint import load_checkpoint, save_checkpoint
from service.models.cmt import Bank, CMTPipeline
from service.models.llm import GenerationConfig
from tests.conftest import tiny_gpt2, tiny_llama


def _outputs(pipeline: CMTPipeline, paragraphs):
    docs = pipeline.compress(paragraphs[:4])
    bank = Bank(docs.memory, docs.key, torch.arange(4.0))
    q = pipeline.compress(["Which river is it?"])
    memories = docs.memory[None, :3]
    with torch.no_grad():
        prefix, _ = pipeline.modules.prefix(q.memory, memories, torch.ones(1, 3, dtype=torch.bool))
    answer = pipeline.answer(["Which river is it?"], bank, generation=GenerationConfig(max_new_tokens=6))[0]
    return docs, prefix, answer


@pytest.mark.parametrize("lexical_key_weight", [0.0, 1.0])
def test_checkpoint_round_trip_reproduces_outputs_bit_exactly(
    make_modules, bpe_tokenizer, paragraphs, tmp_path, lexical_key_weight
):
    llm = tiny_llama(bpe_tokenizer)
    modules = make_modules(llm, seed=3, lexical_key_weight=lexical_key_weight)
    with torch.no_grad():  # move weights off their init so a skipped load would show
        for p in modules.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(tmp_path / "ckpt", modules, llm.identity, metrics={"em": 1.0})
    loaded, config = load_checkpoint(tmp_path / "ckpt", llm.identity, llm.layout)
    assert config["metrics"] == {"em": 1.0} and len(config["compressor_version"]) == 16

    a_docs, a_prefix, a_answer = _outputs(CMTPipeline(modules, llm), paragraphs)
    b_docs, b_prefix, b_answer = _outputs(CMTPipeline(loaded, llm), paragraphs)
    assert torch.equal(a_docs.memory, b_docs.memory) and torch.equal(a_docs.key, b_docs.key)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a_prefix.keys + a_prefix.values, b_prefix.keys + b_prefix.values, strict=True)
    )
    assert a_answer.generation.token_ids == b_answer.generation.token_ids


def test_checkpoint_for_another_llm_is_refused_naming_both(make_modules, bpe_tokenizer, tmp_path):
    llama, gpt2 = tiny_llama(bpe_tokenizer), tiny_gpt2(bpe_tokenizer)
    save_checkpoint(tmp_path / "ckpt", make_modules(llama), llama.identity)
    with pytest.raises(CheckpointMismatchError, match="tiny-llama.*tiny-gpt2"):
        load_checkpoint(tmp_path / "ckpt", gpt2.identity, gpt2.layout)


def test_compressor_version_changes_with_its_weights(make_modules, bpe_tokenizer, tmp_path):
    llm = tiny_gpt2(bpe_tokenizer)
    save_checkpoint(tmp_path / "a", make_modules(llm, seed=1), llm.identity)
    save_checkpoint(tmp_path / "b", make_modules(llm, seed=2), llm.identity)
    versions = [json.loads((tmp_path / d / "config.json").read_text())["compressor_version"] for d in "ab"]
    assert versions[0] != versions[1]


def test_missing_or_foreign_checkpoint_gives_clear_errors(make_modules, bpe_tokenizer, tmp_path):
    llm = tiny_gpt2(bpe_tokenizer)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "nothing", llm.identity, llm.layout)
    save_checkpoint(tmp_path / "c", make_modules(llm), llm.identity)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "c", llm.identity, llm.layout)
    cfg["format_version"] = 1
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "c" / "aligner.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_checkpoint(tmp_path / "c", llm.identity, llm.layout)


def test_fp16_checkpoint_is_half_the_size_loads_into_fp32_modules_and_keeps_the_prompt_profile(
    make_modules, bpe_tokenizer, tmp_path
):
    from service.models.checkpoint import checkpoint_profile
    from service.models.prompts import PROFILES

    llm = tiny_llama(bpe_tokenizer)
    modules = make_modules(llm, seed=4)
    save_checkpoint(tmp_path / "fp32", modules, llm.identity)
    save_checkpoint(tmp_path / "fp16", modules, llm.identity, prompt_profile=PROFILES["fewshot"], dtype=torch.float16)
    size = lambda d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors"))  # noqa: E731
    assert size("fp16") < 0.55 * size("fp32")
    loaded, config = load_checkpoint(tmp_path / "fp16", llm.identity, llm.layout)
    assert checkpoint_profile(config) == PROFILES["fewshot"]
    assert checkpoint_profile(json.loads((tmp_path / "fp32" / "config.json").read_text())).name == "plain"
    for (name, a), b in zip(modules.aligner.state_dict().items(), loaded.aligner.state_dict().values(), strict=True):
        assert b.dtype == torch.float32, name
        assert torch.equal(a.half().float(), b), name
