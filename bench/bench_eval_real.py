"""Full evaluation protocol on the real QA streams (SQuAD, ArchivalQA-proxy): a benchmark, not a test.

One in-house base LLM is trained from scratch on the reading-comprehension form of every *training*
split of ../shared/data (SQuAD train, ArchivalQA-proxy train and qa_train; never a test document),
then frozen; one CMT checkpoint is trained per dataset on its train split (best on its valid split);
then the test stream is compressed into a bank and every row of the protocol is asked.

    .venv/bin/python bench/bench_eval_real.py --datasets squad,archivalqa \
        --cache ~/.cache/cmt-eval-real --out bench/results

Everything trained is cached in --cache, so a second run only evaluates. Measured wall times are in
each report's "bench" entry.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.models.config import AggregatorConfig, AlignerConfig, CompressorConfig
from service.models.llm import HFCausalLM
from trainer.base_llm import BaseLLMConfig, load_base_llm, train_base_llm
from trainer.data import load_split
from trainer.evaluate import run_evaluation, write_report
from trainer.objectives import ObjectiveConfig
from trainer.train import TrainConfig, train

# RC training data of the shared base LLM: every training split, no valid/test document.
LLM_SPLITS = [("squad", "train"), ("archivalqa", "train"), ("archivalqa", "qa_train")]
# Sized for one CPU thread (≈1.5 s a step): longer paragraphs are cut to their last 384 tokens in training.
LLM_CONFIG = BaseLLMConfig(arch="gpt2", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, max_positions=384,
                           steps=400, batch_size=16, lr=2e-3, max_seconds=900)
# Θ/ψ/π: the demo's module sizes; epochs chosen for ≈900 optimizer steps on either dataset.
EPOCHS = {"squad": 10, "archivalqa": 6}


def cmt_config(dataset: str, out: Path, llm_dir: Path, max_seconds: float) -> TrainConfig:
    return TrainConfig(
        llm=str(llm_dir), data=dataset, out=str(out), seed=0, epochs=EPOCHS[dataset], batch_size=16, lr=1e-3, warmup=20,
        distractors=4, ckpt_every=100, valid_questions=120, max_seconds=max_seconds,
        compressor=CompressorConfig(num_memory_tokens=8, num_layers=2, num_heads=8, lexical_key_weight=0.5),
        aggregator=AggregatorConfig(top_k=1, max_docs=8, num_layers=1, num_heads=8),
        aligner=AlignerConfig(prefix_len=8, hidden_dim=256),
        objective=ObjectiveConfig(top_k=1, self_match_weight=0.1, contrastive_weight=0.1),
    )


def ensure_llm(cache: Path) -> tuple[Path, dict]:
    llm_dir = cache / "llm"
    metrics_file = llm_dir / "base_llm_metrics.json"
    if not metrics_file.is_file():
        docs = [d for dataset, split in LLM_SPLITS for d in load_split(dataset, split)]
        train_base_llm(docs, llm_dir, LLM_CONFIG)
    return llm_dir, json.loads(metrics_file.read_text())


def ensure_checkpoint(
    dataset: str, cache: Path, llm: HFCausalLM, llm_dir: Path, max_seconds: float
) -> tuple[Path, dict]:
    run = cache / f"cmt-{dataset}"
    if not (run / "train_log.json").is_file():
        train(cmt_config(dataset, run, llm_dir, max_seconds), llm=llm, train_docs=load_split(dataset, "train"),
              valid_docs=load_split(dataset, "valid"))
    log = json.loads((run / "train_log.json").read_text())
    return run / "best", {k: log[k] for k in ("seconds", "best_valid_em", "valid")} | {"steps": len(log["steps"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="squad,archivalqa")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/cmt-eval-real"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--max-questions", type=int, default=1000,
                        help="questions asked per row, in stream order (0 = all)")
    parser.add_argument("--train-seconds", type=float, default=600, help="wall-time cap of each Θ/ψ/π training run")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = args.cache.expanduser()
    t0 = time.perf_counter()
    llm_dir, llm_metrics = ensure_llm(cache)
    llm = load_base_llm(llm_dir)  # frozen: one instance serves every training run and evaluation
    for dataset in args.datasets.split(","):
        t1 = time.perf_counter()
        ckpt, train_info = ensure_checkpoint(dataset, cache, llm, llm_dir, args.train_seconds)
        report = run_evaluation(llm, ckpt, load_split(dataset, "test"), max_questions=args.max_questions)
        report["data"] = {"source": dataset, "split": "test"}
        report["bench"] = {
            "seconds": time.perf_counter() - t1, "torch_threads": torch.get_num_threads(),
            "base_llm": {
                k: llm_metrics[k] for k in ("seconds", "final_loss", "parameters", "train_rc_examples", "steps_done")
            },
            "base_llm_training_data": [f"{d}/{s}" for d, s in LLM_SPLITS], "cmt_training": train_info,
        }
        name = "archivalqa-proxy" if dataset == "archivalqa" else dataset
        write_report(report, args.out / f"eval-{name}", title=f"CMT evaluation: {name} test stream (in-house base LLM)")
        print((args.out / f"eval-{name}" / "report.md").read_text())
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
