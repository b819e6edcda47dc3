from __future__ import annotations

import json

import torch

from service.models.checkpoint import checkpoint_profile, load_checkpoint, save_checkpoint
from service.models.config import DEFAULT_BACKBONE
from service.models.prompts import PROFILES
from tests.conftest import tiny_llama
from trainer.rekey import rekey


def test_rekey_changes_only_the_retrieval_key_and_keeps_the_trained_memory_path(
    make_modules, bpe_tokenizer, paragraphs, tmp_path
):
    llm = tiny_llama(bpe_tokenizer)
    modules = make_modules(llm, seed=3, lexical_key_weight=0.5)
    modules.compressor.fit_lexical_idf(paragraphs)
    save_checkpoint(tmp_path / "trained", modules, llm.identity, {"alpha": 0.0},
                    prompt_profile=PROFILES["fewshot-context"])
    (tmp_path / "trained" / "train_log.json").write_text(json.dumps({"steps": [1]}))

    out = rekey(tmp_path / "trained", tmp_path / "rekeyed", llm, paragraphs[:50], dtype=torch.float32,
                key_encoder=DEFAULT_BACKBONE, key_dim=1024, lexical_key_weight=1.2)
    new, config = load_checkpoint(out, llm.identity, llm.layout)
    old, old_config = load_checkpoint(tmp_path / "trained", llm.identity, llm.layout)
    assert config["metrics"]["rekeyed_from"] == old_config["compressor_version"] != config["compressor_version"]
    assert checkpoint_profile(config).name == "fewshot-context"
    assert json.loads((out / "train_log.json").read_text()) == {"steps": [1]}

    texts = paragraphs[:3] + ["Which river flows through Basel?"]
    a, b = old.compressor.compress(texts), new.compressor.compress(texts)
    assert torch.equal(a.memory, b.memory), "the memory path must be the trained one"
    assert a.key.shape == (4, 384) and b.key.shape == (4, 1024)
    for part in ("aggregator", "aligner"):
        for (name, x), y in zip(getattr(old, part).state_dict().items(), getattr(new, part).state_dict().values(),
                                strict=True):
            assert torch.equal(x, y), name
    assert new.compressor.lexical_key.weight.shape == (len(new.compressor.key_encoder.tokenizer),)
