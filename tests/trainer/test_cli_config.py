"""TrainConfig on the command line: nested flags from the model's own config classes, docstrings as help."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from service.models.config import AggregatorConfig, AlignerConfig, CompressorConfig
from trainer.cli_config import (
    add_dataclass_arguments,
    dataclass_from_args,
    field_docs,
    flatten,
    override,
)
from trainer.demo import RECENCY_MARGIN, demo_train_config
from trainer.objectives import ObjectiveConfig
from trainer.train import TrainConfig, parse_args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    return parser


def test_every_train_config_field_has_a_docstring_and_it_is_the_help():
    docs = field_docs(TrainConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(docs.values())
    help_text = " ".join(_parser().format_help().split())
    assert "--compressor.num-memory-tokens" in help_text and "k: memory vectors per document" in help_text
    assert "Continue from <out>/last" in help_text


def test_defaults_round_trip_and_keep_the_trainers_own_defaults():
    config = dataclass_from_args(TrainConfig, _parser().parse_args([]))
    assert config == TrainConfig()
    assert (config.compressor.num_memory_tokens, config.compressor.lexical_key_weight) == (8, 0.5)
    assert (config.aligner.prefix_len, config.aligner.hidden_dim) == (8, 256)
    assert (config.objective.self_match_weight, config.objective.contrastive_weight) == (0.1, 0.1)


def test_nested_flags_and_booleans():
    config = parse_args([
        "--llm", "x", "--data", "squad-train=0.7,qed=0.2,archivalqa=0.1", "--llm-dtype", "bfloat16", "--resume",
        "--compressor.num-memory-tokens", "16", "--no-compressor.key-from-backbone", "--aligner.prefix-len", "4",
        "--objective.top-k", "2", "--aggregator.top-k", "2", "--no-objective.use-top-k", "--objective.alpha", "0.5",
    ])
    assert config.resume and config.llm_dtype == "bfloat16" and config.data.startswith("squad-train=")
    assert config.compressor == CompressorConfig(num_memory_tokens=16, key_from_backbone=False, lexical_key_weight=0.5)
    assert config.aligner.prefix_len == 4 and config.aggregator.top_k == 2
    assert config.objective.top_k == 2 and not config.objective.use_top_k and config.objective.alpha == 0.5


@pytest.mark.parametrize("argv", [
    ["--llm-dtype", "int8"], ["--prompt-profile", "nope"], ["--objective.top-k", "2"], ["--data", "squad=1,qed"],
    ["--compressor.num-heads", "7"],
])
def test_invalid_settings_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--llm", "x", *argv])


def test_override_and_flatten_use_dotted_names():
    config = override(TrainConfig(), {"objective.use_top_k": False, "aggregator.max_docs": 64, "distractors": 3})
    assert not config.objective.use_top_k and config.aggregator.max_docs == 64 and config.distractors == 3
    flat = flatten(config)
    assert flat["aggregator.max_docs"] == 64 and flat["objective.use_top_k"] is False
    assert flatten(dataclasses.asdict(config)) == flat
    with pytest.raises(ValueError):
        override(TrainConfig(), {"memory_tokens": 4})


def test_demo_trains_the_same_model_as_before_the_nested_config():
    """Demo v7's effective settings, as the flat TrainConfig turned them into module and objective configs."""
    config = demo_train_config("out", "llm", 480)
    assert config.cmt_config().to_dict() == {
        "compressor": dataclasses.asdict(CompressorConfig(
            num_memory_tokens=8, memory_dim=384, num_layers=2, num_heads=8, key_from_backbone=True,
            lexical_key_weight=0.5,
        )),
        "aggregator": dataclasses.asdict(AggregatorConfig(
            top_k=1, max_docs=8, num_layers=1, num_heads=8, recency_margin=RECENCY_MARGIN,
        )),
        "aligner": dataclasses.asdict(AlignerConfig(prefix_len=8, hidden_dim=256)),
    }
    assert config.objective == ObjectiveConfig(top_k=1, alpha=0.0, self_match_weight=0.1, self_match_lambda=0.1,
                                               force_gold=True, use_top_k=True, contrastive_weight=0.1)
    assert (config.epochs, config.batch_size, config.lr, config.warmup, config.distractors, config.hard_distractors,
            config.ckpt_every, config.valid_questions, config.seed, config.max_seconds) == (
        16, 16, 1e-3, 20, 4, True, 100, 120, 0, 480)
