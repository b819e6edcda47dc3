"""Full evaluation benchmark (not a test): demo LLM + checkpoint on the synthetic stream, optional
ablation runs (same budget, one term off each), then the streamed evaluation report.

    .venv/bin/python bench/bench_eval.py --cache ~/.cache/cmt-demo --out bench/results/eval-synthetic \
        [--ablations] [--data synthetic-demo:7000] [--max-questions 400]

SQuAD / ArchivalQA-proxy: bench/bench_eval_real.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.base_llm import load_base_llm
from trainer.cli_config import override
from trainer.data import load_source, synthetic_stream
from trainer.demo import (
    DEMO_BUDGET_S,
    DEMO_STREAM,
    DEMO_VERSION,
    demo_train_config,
    ensure_demo_checkpoint,
)
from trainer.evaluate import run_evaluation, write_report
from trainer.train import train

# The demo (main row) trains with α=0, so the memory-aware term is measured by switching it on.
# Changes by TrainConfig field, nested ones by dotted name (trainer.cli_config.override).
ABLATIONS = {
    "with memory-aware objective (alpha=0.5)": {"objective.alpha": 0.5},
    "without self-matching / key losses": {"objective.self_match_weight": 0.0, "objective.contrastive_weight": 0.0},
    "without top-k (whole bank, MAC-style)": {
        "objective.use_top_k": False, "aggregator.max_docs": 64, "distractors": 8,
    },
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/cmt-demo"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/eval-synthetic"))
    parser.add_argument("--data", default="synthetic-demo:7000",
                        help="test stream (same seed as training: entity-disjoint); 7000 entities give a test stream "
                             "over 10x longer than the part holding the retention questions")
    parser.add_argument("--max-questions", type=int, default=0)
    parser.add_argument("--ablations", action="store_true", help="train the three ablation checkpoints first")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    args.cache = args.cache.expanduser()
    llm_dir, ckpt = ensure_demo_checkpoint(args.cache)
    llm = load_base_llm(llm_dir)
    ablations = {}
    if args.ablations:
        stream = synthetic_stream(DEMO_STREAM)
        main_config = demo_train_config(args.cache / "cmt", llm_dir, DEMO_BUDGET_S["cmt"])
        for i, (name, change) in enumerate(ABLATIONS.items()):
            out = args.cache / f"ablations-v{DEMO_VERSION}" / f"ablation{i}"  # versioned: never mixed with another demo
            if not (out / "train_log.json").is_file():  # written last: a cut-off run resumes from out/last
                # same epochs as the main run; the wall-time cap only guards against a run that never ends
                config = override(
                    main_config, {"out": str(out), "max_seconds": 4 * main_config.max_seconds, "resume": True, **change}
                )
                train(config, llm=llm, train_docs=stream["train"], valid_docs=stream["valid"])
            ablations[name] = str(out / "best")
    docs = load_source(args.data, "test", seed=DEMO_STREAM.seed)
    report = run_evaluation(llm, ckpt, docs, ablations=ablations, max_questions=args.max_questions)
    report["data"] = {"source": args.data, "split": "test", "seed": DEMO_STREAM.seed}
    report["bench_seconds"] = time.perf_counter() - t0
    report["demo"] = json.loads((args.cache / "demo.json").read_text())
    write_report(report, args.out, title=f"CMT evaluation: {args.data} test (demo LLM and checkpoint)")
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
