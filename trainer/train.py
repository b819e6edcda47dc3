r"""Offline trainer of Θ/ψ/π against a frozen LLM (docs/DESIGN.md §1).

    python -m trainer.train --llm runs/llm --data "squad-train=0.7,qed=0.2,archivalqa=0.1" --out runs/cmt \
        --llm-dtype bfloat16 --compressor.num-memory-tokens 16 --aligner.prefix-len 16 \
        --objective.top-k 2 --aggregator.top-k 2 --objective.alpha 0.5

Flags: one per TrainConfig field, nested configs with their name and a dot (`--compressor.*`,
`--aggregator.*`, `--aligner.*`, `--objective.*`; booleans `--x` / `--no-x`); each flag's help is
the field's docstring (`--help` lists them all). --data takes one source or a weighted mixture
(trainer.mixture). Every objective term is switchable for ablations (--objective.alpha 0,
--objective.self-match-weight 0, --no-objective.use-top-k).

Writes <out>/best (the best validation by (EM, F1, -valid answer loss)), <out>/last (+ trainer_state.pt,
for --resume) every --ckpt-every optimizer steps, and <out>/train_log.json (per step: losses, lr,
LLM tokens/s and questions/s; per validation: every component of the ranking).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.models.config import (
    AggregatorConfig,
    AlignerConfig,
    CMTConfig,
    CompressorConfig,
)
from service.models.llm import HFCausalLM
from service.models.prompts import PROFILES
from trainer.cli_config import add_dataclass_arguments, dataclass_from_args
from trainer.mixture import parse_mixture
from trainer.objectives import ObjectiveConfig
from trainer.train_loop import (
    STATE_FILE,
    build_or_resume_modules,
    finish,
    load_state,
    make_optimizer,
    restore_progress,
    setup,
    train_epoch,
    validate,
)

__all__ = ["STATE_FILE", "TrainConfig", "main", "parse_args", "train"]

LLM_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    llm: str = ""
    """Frozen LLM: directory (e.g. from trainer.base_llm), .gguf file, hub id or smollm2-135m-instruct."""
    llm_dtype: str = "float32"
    """Weights of the frozen LLM when loaded from --llm: float32, bfloat16 or float16 (bfloat16 halves its
    memory on a GPU; training runs under bf16 autocast on CUDA whatever this is)."""
    prompt_profile: str = "plain"
    """How the LLM is asked a question (service.models.prompts.PROFILES: plain, fewshot, chat); recorded in
    the checkpoints, so that serving and evaluation ask alike."""
    data: str = "synthetic"
    """Training source: "synthetic[:entities]", "synthetic-demo[:entities]", "squad", "squad-train", "qed",
    "archivalqa", a JSONL path pattern with {split}; or a mixture "SOURCE=WEIGHT,SOURCE=WEIGHT,..."
    whose weights set each source's share of an epoch's questions (trainer.mixture)."""
    valid_data: str = ""
    """Validation source(s), same syntax ("" = the training sources, with their weights)."""
    valid_split: str = "valid"
    """Split of the validation sources (e.g. "qa_valid" of archivalqa)."""
    epoch_questions: int = 0
    """Training questions per epoch, drawn from the sources by weight (0 = as many as they hold together;
    a single source is then not resampled: each question once per epoch)."""
    out: str = "runs/cmt"
    """Output directory: best/, last/ and train_log.json."""
    seed: int = 0
    """Seeds initialisation, batch order, distractors and mixture sampling."""
    epochs: int = 3
    """Passes over the training questions; the LR schedule spans them all."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs); the LR schedule still spans the epochs,
    so a stopped run can be resumed exactly."""
    max_seconds: float = 0.0
    """Stop after this much wall time (0 = no limit); validation and the best checkpoint still happen."""
    batch_size: int = 16
    """Questions per batch (their gold documents are all distinct)."""
    grad_accum: int = 1
    """Batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate of AdamW (linear warmup, then cosine decay to 5%)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup: int = 50
    """Optimizer steps of linear warmup."""
    distractors: int = 8
    """Sampled training documents added to each batch's bank, beside the batch's own documents."""
    hard_distractors: bool = True
    """Add the other reports about the same entity (superseded facts) to the bank."""
    ckpt_every: int = 200
    """Write <out>/last every this many optimizer steps (0 = only at the end)."""
    valid_questions: int = 200
    """Validation questions per validation, split by weight across the sources (0 = no validation)."""
    train_limit: int = 0
    """Use only the first N training documents of each source (0 = all)."""
    device: str = "auto"
    """"auto" (CUDA when there is one), "cpu", "cuda", "cuda:1"..."""
    cache_backbone: bool = True
    """Cache the frozen backbone's hidden states per text (exact: the backbone is frozen)."""
    progress: bool = True
    """Show progress bars."""
    resume: bool = False
    """Continue from <out>/last (optimizer, schedule, data position and RNG states included)."""
    init_from: str = ""
    """Start Θ/ψ/π from this checkpoint's weights (same shapes; the configs given here are used, so e.g.
    --aggregator.queries may change), with a fresh optimizer and schedule ("" = random initialisation)."""
    train_only: str = ""
    """Comma-separated name prefixes of the only parameters to train (e.g.
    "compressor.token_pool.token_salience,aligner.prompt_embedding"); the rest stays at its start ("" = train
    everything). An answer loss alone turns every free path into a constant prompt within a few hundred
    steps (bench/bench_memory_use.py: ψ's output stopped depending on the document); keeping the memory
    path fixed and giving the prompt its own tokens leaves training only what to pick."""
    compressor: CompressorConfig = field(
        default_factory=lambda: CompressorConfig(num_memory_tokens=8, lexical_key_weight=0.5)
    )
    """Θ (service.models.config.CompressorConfig); the trainer starts with k=8 memory tokens and a lexical key
    weight of 0.5: without it the dense key confuses invented names that share pieces."""
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    """ψ (AggregatorConfig): its top_k is the checkpoint's serving default and must equal objective.top_k;
    recency_margin is only recorded for inference (training selects by score with the gold forced in)."""
    aligner: AlignerConfig = field(default_factory=lambda: AlignerConfig(prefix_len=8, hidden_dim=256))
    """π (AlignerConfig); the trainer starts with p=8 prefix positions and a 256-wide bottleneck."""
    objective: ObjectiveConfig = field(
        default_factory=lambda: ObjectiveConfig(self_match_weight=0.1, contrastive_weight=0.1)
    )
    """Loss terms (trainer.objectives.ObjectiveConfig); the trainer weighs self-matching and the contrastive
    key loss 0.1 each. objective.alpha is also recorded as the checkpoint's inference α."""

    def __post_init__(self) -> None:
        if self.llm_dtype not in LLM_DTYPES:
            raise ValueError(f"llm_dtype must be one of {LLM_DTYPES}, got {self.llm_dtype!r}")
        if self.prompt_profile not in PROFILES:
            raise ValueError(f"prompt_profile must be one of {sorted(PROFILES)}, got {self.prompt_profile!r}")
        if self.objective.top_k != self.aggregator.top_k:
            raise ValueError(
                f"objective.top_k={self.objective.top_k} (training) != aggregator.top_k={self.aggregator.top_k} (the "
                "checkpoint's serving default): set both (--objective.top-k N --aggregator.top-k N)"
            )
        if self.init_from and self.resume:
            raise ValueError("--init-from starts a new run; --resume continues <out>/last: give one of them")
        for spec in (self.data, self.valid_data):
            if spec:
                parse_mixture(spec)
        self.cmt_config()  # checks across modules (heads dividing the memory width)

    def cmt_config(self) -> CMTConfig:
        return CMTConfig(compressor=self.compressor, aggregator=self.aggregator, aligner=self.aligner)


def train(
    config: TrainConfig, llm: HFCausalLM | None = None, train_docs: Sequence[dict] | None = None,
    valid_docs: Sequence[dict] | None = None,
) -> dict[str, Any]:
    """Train; returns the log (also written to <out>/train_log.json). Data and LLM may be passed in
    (a document list handed in forms one source; the one not handed in is loaded from config.data/valid_data)."""
    run = setup(config, llm, train_docs, valid_docs)  # seed, device, out dir, frozen LLM, data
    state = load_state(run)  # <out>/last's trainer state when resuming, else None
    run.modules = build_or_resume_modules(run, state)  # Θ/ψ/π; drops documents Θ refuses; validation questions
    run.opt, run.sched = make_optimizer(run, state)  # AdamW + warmup/cosine schedule
    restore_progress(run, state)  # step, data position, best so far, log, RNG; starts the clock
    if state is None and run.valid_ex:
        validate(run, -1)  # the start is a candidate: a run whose training only hurts never ships worse than its start
    for epoch in range(run.epoch, config.epochs):
        stopped = train_epoch(run, epoch)
        if run.valid_ex:
            validate(run, epoch)  # writes <out>/best when better
        if stopped:
            break
    return finish(run)  # <out>/last, train_log.json


def parse_args(argv: list[str] | None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_args(TrainConfig, args)
    except ValueError as e:
        parser.error(str(e))
    if not config.llm:
        parser.error("--llm (an LLM directory, .gguf file, hub id or smollm2-135m-instruct) is required")
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    log = train(config)
    print(json.dumps({"best_valid_em": log["best_valid_em"], "best": log.get("best"), "valid": log["valid"],
                      "seconds": round(log["seconds"], 1), "out": config.out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
