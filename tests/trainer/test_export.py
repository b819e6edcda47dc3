from __future__ import annotations

import json

import torch

from service.models.checkpoint import checkpoint_profile, load_checkpoint, save_checkpoint
from service.models.prompts import PROFILES
from tests.conftest import tiny_llama
from trainer.export import export_checkpoint


def test_export_writes_fp16_weights_the_same_profile_and_the_training_log(make_modules, bpe_tokenizer, tmp_path):
    llm = tiny_llama(bpe_tokenizer)
    modules = make_modules(llm, seed=5)
    save_checkpoint(tmp_path / "run" / "best", modules, llm.identity, {"alpha": 0.0},
                    prompt_profile=PROFILES["fewshot-context"])
    (tmp_path / "run" / "train_log.json").write_text(json.dumps({"steps": [1, 2]}))
    out = export_checkpoint(tmp_path / "run" / "best", tmp_path / "shipped", llm)
    loaded, config = load_checkpoint(out, llm.identity, llm.layout)
    assert checkpoint_profile(config).name == "fewshot-context" and config["metrics"] == {"alpha": 0.0}
    assert json.loads((out / "train_log.json").read_text()) == {"steps": [1, 2]}
    for (name, a), b in zip(modules.aggregator.state_dict().items(), loaded.aggregator.state_dict().values(),
                            strict=True):
        assert torch.equal(a.half().float(), b), name
