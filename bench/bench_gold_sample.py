"""The gold-paragraph row (the frozen LLM reading the paragraph that holds the answer) over a stream's questions
in a seeded random order, written after every chunk: a run stopped early is still a uniform random sample of
the whole stream, reported with its standard error. On 2 CPU cores the row costs ~0.56 s a SQuAD question
(80 min for the 8,611 of the test stream), the CMT row 0.2 s: this is how the ratio of the two is had in a
session. Predictions go through the evaluation's disk cache, so bench_eval_smollm2.py reuses them.

    .venv/bin/python bench/bench_gold_sample.py --dataset squad --split test --threads 2

Writes bench/results/gold-row-<dataset>-<split>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.models.checkpoint import checkpoint_profile, read_checkpoint_config
from service.models.llm import HFCausalLM
from trainer.data import examples, load_split
from trainer.eval_answer import MAX_NEW_TOKENS, generation_config, prompt_text, run_prompts
from trainer.prediction_cache import DEFAULT_CACHE_DIR, PredictionCache
from trainer.scoring import score

RESULTS = Path(__file__).resolve().parent / "results"


def summary(scores: list[dict[str, float]], metric: str) -> dict[str, float]:
    """Mean × 100 and its standard error over the questions answered so far."""
    values = [100.0 * s[metric] for s in scores]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return {"mean": round(mean, 2), "standard_error": round(math.sqrt(var / len(values)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("models/smollm2-135m-instruct"),
                        help="whose prompt profile the LLM is asked with")
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--dataset", default="squad")
    parser.add_argument("--split", default="test")
    parser.add_argument("--chunk", type=int, default=256, help="questions between two writes of the report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    llm = HFCausalLM.from_pretrained(args.llm, dtype=torch.float32)
    profile = checkpoint_profile(read_checkpoint_config(args.checkpoint))
    cache = PredictionCache(args.cache_dir, llm, profile, generation_config(0.0, MAX_NEW_TOKENS, profile))
    exs = examples(load_split(args.dataset, args.split))
    order = list(range(len(exs)))
    random.Random(args.seed).shuffle(order)
    out = RESULTS / f"gold-row-{args.dataset}-{args.split}.json"
    scores: list[dict[str, float]] = []
    start = time.perf_counter()
    for i in range(0, len(order), args.chunk):
        chunk = [exs[j] for j in order[i : i + args.chunk]]
        prompts = [prompt_text(llm, profile, e.question, [e.document], MAX_NEW_TOKENS) for e in chunk]
        run = run_prompts(llm, prompts, cache, args.batch_size)
        scores += [score(p, e.answers) for p, e in zip(run.predictions, chunk, strict=True)]
        report = {"llm": args.llm, "llm_dtype": "float32", "prompt_profile": profile.name, "dataset": args.dataset,
                  "split": args.split, "questions": len(exs), "answered": len(scores),
                  "complete": len(scores) == len(exs), "order": f"random.Random({args.seed}).shuffle",
                  "em": summary(scores, "em"), "f1": summary(scores, "f1"),
                  "seconds": round(time.perf_counter() - start, 1)}
        out.write_text(json.dumps(report, indent=1))
        print(f"{len(scores):5d}/{len(exs)}  EM {report['em']['mean']:5.1f} ± {report['em']['standard_error']:.1f}  "
              f"F1 {report['f1']['mean']:5.1f} ± {report['f1']['standard_error']:.1f}", flush=True)
    cache.close()


if __name__ == "__main__":
    main()
