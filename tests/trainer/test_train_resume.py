"""A stopped training run resumed from <out>/last continues exactly where the uninterrupted run would be."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from service.models.checkpoint import load_checkpoint
from service.models.config import AggregatorConfig, AlignerConfig, CompressorConfig
from tests.conftest import tiny_gpt2
from trainer.data import SyntheticConfig, synthetic_stream
from trainer.objectives import ObjectiveConfig
from trainer.train import STATE_FILE, TrainConfig, train

STREAM = SyntheticConfig(seed=1, num_entities=40, kinds=("city", "staff"), pool_size=6, fillers=0, distractor_ratio=0.2)


def _config(out, **change) -> TrainConfig:
    config = TrainConfig(
        out=str(out), epochs=2, batch_size=8, lr=1e-3, warmup=2, distractors=2, ckpt_every=1, progress=False,
        valid_questions=0,
        compressor=CompressorConfig(num_memory_tokens=4, num_layers=1, num_heads=4, lexical_key_weight=0.5),
        aggregator=AggregatorConfig(top_k=1, max_docs=6, num_layers=1, num_heads=4),
        aligner=AlignerConfig(prefix_len=4, hidden_dim=32),
        objective=ObjectiveConfig(top_k=1, self_match_weight=0.1, contrastive_weight=0.1),
    )
    return dataclasses.replace(config, **change)


def _weights(run_dir, llm) -> dict[str, torch.Tensor]:
    modules, _ = load_checkpoint(run_dir / "last", llm.identity, llm.layout)
    return {n: p.detach() for n, p in modules.state_dict().items()}


def test_resumed_run_matches_the_uninterrupted_run_step_for_step(tmp_path, bpe_tokenizer):
    torch.set_num_threads(1)  # one thread: CPU reductions are then bit-reproducible across runs
    stream = synthetic_stream(STREAM)
    llm = tiny_gpt2(bpe_tokenizer)

    full = train(_config(tmp_path / "full"), llm=llm, train_docs=stream["train"], valid_docs=[])
    steps_total = len(full["steps"])
    assert steps_total >= 4, "the stream is too small to stop in the middle"

    cut = train(_config(tmp_path / "cut", max_steps=3), llm=llm, train_docs=stream["train"], valid_docs=[])
    assert len(cut["steps"]) == 3
    state = torch.load(tmp_path / "cut" / "last" / STATE_FILE, weights_only=False)
    assert (state["step"], state["epoch"], state["batch"]) == (3, 0, 3)

    resumed = train(_config(tmp_path / "cut", resume=True), llm=llm, train_docs=stream["train"], valid_docs=[])
    assert [s["step"] for s in resumed["steps"]] == list(range(1, steps_total + 1))
    # Not bit-exact: the resumed run fills its backbone cache from other batches (other padding), which
    # moves hidden states by float rounding (~1e-9) and Adam turns that into weight noise of ~1e-6 on
    # near-zero gradients. A resume bug (lost optimizer moments, schedule, data position or RNG) moves
    # the losses and weights by the size of an update (lr = 1e-3) or more.
    assert [s["loss"] for s in resumed["steps"]] == pytest.approx([s["loss"] for s in full["steps"]], rel=1e-6)
    assert json.loads((tmp_path / "cut" / "train_log.json").read_text())["steps"] == resumed["steps"]
    a, b = _weights(tmp_path / "full", llm), _weights(tmp_path / "cut", llm)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-4), \
            f"{name} differs after resuming: {(a[name] - b[name]).abs().max()}"


def test_resume_without_saved_state_starts_from_scratch(tmp_path, bpe_tokenizer):
    torch.set_num_threads(1)
    stream = synthetic_stream(STREAM)
    llm = tiny_gpt2(bpe_tokenizer)
    log = train(_config(tmp_path / "fresh", resume=True, max_steps=2), llm=llm, train_docs=stream["train"],
                valid_docs=[])
    assert [s["step"] for s in log["steps"]] == [1, 2]
    assert (tmp_path / "fresh" / "last" / STATE_FILE).is_file()


def test_starting_point_is_validated_so_training_that_only_hurts_never_ships_worse(tmp_path, bpe_tokenizer):
    torch.set_num_threads(1)
    stream = synthetic_stream(STREAM)
    llm = tiny_gpt2(bpe_tokenizer)
    log = train(_config(tmp_path / "run", valid_questions=20, lr=0.3), llm=llm, train_docs=stream["train"],
                valid_docs=stream["valid"])
    entries = log["valid"]
    assert [e["epoch"] for e in entries] == [-1, 0, 1] and entries[0]["step"] == 0
    # the first of equals, as the trainer keeps it
    best = max(entries, key=lambda e: (e["em"], e["f1"], -e["valid_loss"]))
    assert json.loads((tmp_path / "run" / "best" / "config.json").read_text())["metrics"]["valid"] == best

