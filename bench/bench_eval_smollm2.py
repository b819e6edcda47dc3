"""The committed evaluation reports for SmolLM2-135M-Instruct: a benchmark, not a test.

One frozen LLM (default the packaged `smollm2-135m-instruct`), one trained CMT checkpoint (or one per
dataset), and the full protocol of trainer.evaluate on three real streams:

| data | split | questions asked |
|---|---|---|
| squad | test | the first 1,000 of the stream |
| archivalqa (ArchivalQA-proxy) | test | all 966 |
| qed | valid | all 1,351 |

    .venv/bin/python bench/bench_eval_smollm2.py --checkpoint runs/smollm2/best \
        [--datasets squad,archivalqa,qed] [--llm smollm2-135m-instruct] [--cache-dir ~/.cache/cmt/eval]

writes bench/results/eval-smollm2-<data>/ (report.json, report.md with this command, plots).
`--checkpoint squad=A --checkpoint qed=B` gives each dataset its own checkpoint. Prompt-only rows
(no memory, gold paragraph, RAG) are cached per (LLM, profile, generation settings, prompt), so a
rerun after a new checkpoint recomputes only the CMT rows (and the timing pass: every row answers
its first --timing-questions again, uncached, so CMT and RAG are timed on the same questions and
batches in the same run).

Time on 2 CPU cores: a 1,000-question gold-paragraph row alone takes ~10 min (SmolLM2 prefill
~0.3 ms per token), and Θ reads each stream twice (the bank, the MiniLM recall baseline). A check
with `--max-questions 30 --retention-docs 1 --robustness-questions 2 --out /tmp/x` took 23 min for
the three datasets on a machine shared with two other jobs, 5.5 min for ArchivalQA-proxy alone with
its prompt-only rows cached. On a shared machine pass `--threads 1`: two torch threads competing
with other processes ran a 16-question CMT batch in ~70 s instead of ~3 s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.models.llm import HFCausalLM
from service.models.prompts import PROFILES
from service.runtime.engine import DTYPES
from trainer.data import load_split
from trainer.eval_answer import MAX_NEW_TOKENS
from trainer.evaluate import ROW_GROUPS, command_line, run_evaluation, write_report
from trainer.prediction_cache import DEFAULT_CACHE_DIR

# data name → (split, questions asked (0 = all), report name, title)
RUNS = {
    "squad": ("test", 1000, "squad", "SQuAD test stream"),
    "archivalqa": ("test", 0, "archivalqa-proxy", "ArchivalQA-proxy test stream"),
    "qed": ("valid", 0, "qed", "QED valid"),
}
BATCH_SIZE = 16
"""Questions per LLM batch in every row; 16 keeps QED's longest RAG top-3 prompts (a few thousand tokens) in memory."""


def checkpoints(values: list[str], datasets: list[str]) -> dict[str, str]:
    """--checkpoint PATH (every dataset) and/or DATA=PATH (that dataset)."""
    plain = [v for v in values if v.split("=", 1)[0] not in RUNS]
    out = {d: plain[-1] for d in datasets} if plain else {}
    out.update(dict(v.split("=", 1) for v in values if v not in plain))
    missing = [d for d in datasets if d not in out]
    if missing:
        raise SystemExit(f"no --checkpoint for {missing}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="[DATA=]PATH")
    parser.add_argument("--llm", default="smollm2-135m-instruct", help="the frozen LLM the checkpoint was trained for")
    parser.add_argument("--datasets", default=",".join(RUNS), help=f"comma-separated, of {sorted(RUNS)}")
    parser.add_argument("--max-questions", type=int, default=None,
                        help="override every dataset's question count (a quick check)")
    parser.add_argument("--prompt-profile", choices=sorted(PROFILES), default=None,
                        help="profile of the prompt-only rows; default: the checkpoint's")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--timing-questions", type=int, default=64,
                        help="questions every row answers again, timed, uncached")
    parser.add_argument("--retention-docs", type=int, default=100)
    parser.add_argument("--robustness-questions", type=int, default=100)
    parser.add_argument("--rag-k", default="1,3",
                        help="RAG rows: top-k documents in the prompt, comma-separated (\"\" = none)")
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME=CHECKPOINT")
    parser.add_argument("--rows", default=",".join(ROW_GROUPS),
                        help=f"comma-separated groups of rows, of {ROW_GROUPS} or cmt-top (the CMT top-k row alone)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="the frozen LLM's dtype (Θ/ψ/π stay float32); the prompt-only cache keeps dtypes apart")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    datasets = args.datasets.split(",")
    unknown = sorted(set(datasets) - set(RUNS))
    if unknown:
        parser.error(f"unknown datasets {unknown}; known: {sorted(RUNS)}")
    ckpts = checkpoints(args.checkpoint, datasets)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = command_line(argv, "python bench/bench_eval_smollm2.py")
    t0 = time.perf_counter()
    llm = HFCausalLM.from_pretrained(args.llm, device=args.device, dtype=DTYPES[args.dtype])
    for data in datasets:
        split, questions, name, title = RUNS[data]
        t1 = time.perf_counter()
        docs = load_split(data, split)
        report = run_evaluation(
            llm, ckpts[data], docs, ablations=dict(a.rsplit("=", 1) for a in args.ablation),
            max_questions=questions if args.max_questions is None else args.max_questions,
            retention_docs=args.retention_docs, robustness_questions=args.robustness_questions,
            prompt_profile=args.prompt_profile, cache_dir=args.cache_dir, batch_size=args.batch_size,
            max_new_tokens=MAX_NEW_TOKENS, timing_questions=args.timing_questions, device=args.device,
            rag_k=[int(k) for k in args.rag_k.split(",") if k], rows=[r for r in args.rows.split(",") if r],
            command=command,
        )
        report["data"] = {"source": data, "split": split}
        report["bench"] = {"seconds": time.perf_counter() - t1, "torch_threads": torch.get_num_threads(),
                           "llm_dtype": args.dtype}
        out = args.out / f"eval-smollm2-{name}"
        asked, stream = report["questions"], sum(len(d.get("questions") or []) for d in docs)
        which = f"all {asked:,}" if asked == stream else f"first {asked:,} of {stream:,}"
        write_report(report, out, title=f"CMT evaluation: {title} ({which} questions), {args.llm}")
        print((out / "report.md").read_text())
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
