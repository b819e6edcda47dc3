"""Streamed evaluation of CMT against no-memory and RAG baselines, with the same frozen LLM.

    python -m trainer.evaluate --llm runs/llm --checkpoint runs/cmt/best --data squad --split test --out runs/eval \
        [--max-questions 1000] [--prompt-profile fewshot] [--cache-dir ~/.cache/cmt/eval] [--batch-size 32] \
        [--ablation no_alpha=runs/abl_alpha/best ...]

The test documents are streamed (in date order) into an in-memory bank, then every question is
asked, by every row, of the same frozen LLM (greedy, one batch size):

- no memory; the gold paragraph in the prompt (the ceiling);
- RAG: the top-1 and top-3 documents as raw text, retrieved by BM25 and by the checkpoint's trained keys;
- CMT with its top-k; CMT over the whole bank MAC-style (every document up to the aggregator's
  max_docs: a larger bank gives the max_docs best by key, which the row's name and note say);
- one CMT row per `--ablation NAME=CHECKPOINT`.

Prompt-only rows use the checkpoint's prompt profile unless `--prompt-profile` overrides it, and
their answers are cached on disk per (LLM, profile, generation settings, prompt text) under
`--cache-dir`, so a second run (or a RAG prompt equal to the gold prompt) computes nothing again.
Scores per row, each apart: official SQuAD EM/F1, containment of the gold answer, mean answer
length in words, the papers' prefix-EM. Cost per row: stored bytes per document, prompt (prefill)
positions and measured seconds per question (every row answers its first `--timing-questions`
again, timed, without the cache: the same questions and batches for CMT and RAG). Sections: retention
of the first documents' answers as the stream grows, robustness to irrelevant documents, retrieval
recall@1/@5 of the trained keys against the untrained MiniLM mean-pooled embedding and BM25.
Writes <out>/report.json, <out>/report.md (with the command line) and PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

from service.models.checkpoint import checkpoint_profile, load_checkpoint
from service.models.llm import HFCausalLM
from service.models.prompts import PROFILES, PromptProfile, get_profile
from trainer.data import examples, load_source
from trainer.eval_answer import (
    BATCH_SIZE,
    MAX_NEW_TOKENS,
    answer_cmt,
    answer_prompts,
    compress_bank,
    evaluate_cmt,
    fit_prompt,
    generation_config,
)
from trainer.eval_report import write_report
from trainer.eval_retrieval import _recall, bm25_top, retrieval_recall
from trainer.eval_rows import EvalContext, ablation_rows, baseline_rows, cmt_rows, examples_section, rag_rows
from trainer.eval_sections import cost_section, irrelevant_pool, retention_section, robustness_section
from trainer.prediction_cache import DEFAULT_CACHE_DIR, PredictionCache
from trainer.service_eval import evaluate_service

TIMING_QUESTIONS = 32
ROW_GROUPS = ("baselines", "rag", "cmt", "ablations")
"""Groups of report rows (all of them by default): no memory + gold paragraph, RAG, CMT (top-k and whole bank),
ablations. Also accepted: "cmt-top", the CMT top-k row alone (a selection change that leaves the whole-bank row
as a committed report has it)."""

__all__ = [  # the trainer, the benchmarks and the tests import these from here
    "BATCH_SIZE", "MAX_NEW_TOKENS", "TIMING_QUESTIONS", "_recall", "answer_cmt", "answer_prompts", "bm25_top",
    "command_line", "compress_bank", "evaluate_cmt", "fit_prompt", "generation_config", "irrelevant_pool",
    "load_context", "main", "retrieval_recall", "run_evaluation", "write_report",
]


def load_context(
    llm: HFCausalLM, checkpoint: str | Path, test_docs: Sequence[dict[str, Any]], *, max_questions: int = 0,
    alpha: float | None = None, recency_margin: float | None = None, prompt_profile: str | PromptProfile | None = None,
    cache_dir: str | Path | None = None, batch_size: int = BATCH_SIZE, max_new_tokens: int = MAX_NEW_TOKENS,
    timing_questions: int = TIMING_QUESTIONS, device: str = "cpu", progress: bool = True,
) -> tuple[EvalContext, dict[str, Any]]:
    """The checkpoint's modules (α and recency margin: its own unless given), the questions, the
    compressed bank and the prediction cache of the baseline profile; and the checkpoint's config."""
    modules, ckpt = load_checkpoint(checkpoint, llm.identity, llm.layout, device=device)
    if recency_margin is not None:
        modules.config.aggregator = dataclasses.replace(modules.config.aggregator, recency_margin=recency_margin)
    cmt_profile = checkpoint_profile(ckpt)
    baseline = cmt_profile if prompt_profile is None else get_profile(prompt_profile)
    t = time.perf_counter()
    bank = compress_bank(modules, test_docs)
    cache = PredictionCache(cache_dir, llm, baseline, generation_config(0.0, max_new_tokens, baseline))
    ctx = EvalContext(
        llm=llm, modules=modules, docs=list(test_docs), exs=examples(test_docs)[: max_questions or None], bank=bank,
        cmt_profile=cmt_profile, cache=cache, alpha=ckpt["metrics"].get("alpha", 0.0) if alpha is None else alpha,
        top_k=modules.config.aggregator.top_k, margin=modules.config.aggregator.recency_margin, batch_size=batch_size,
        max_new_tokens=max_new_tokens, progress=progress, timing_questions=timing_questions,
        timings={"bank_compress_seconds": time.perf_counter() - t},
    )
    return ctx, ckpt


def report_header(ctx: EvalContext, checkpoint: str | Path, command: str | None) -> dict[str, Any]:
    """What was evaluated, and how every row asks the LLM."""
    return {"command": command, "checkpoint": str(checkpoint), "llm": ctx.llm.identity.name_or_path, "alpha": ctx.alpha,
            "top_k": ctx.top_k, "max_docs": ctx.modules.config.aggregator.max_docs, "recency_margin": ctx.margin,
            "prompt_profile": ctx.baseline_profile.name, "checkpoint_prompt_profile": ctx.cmt_profile.name,
            "prompt_profiles": {"baseline": ctx.baseline_profile.to_dict(), "checkpoint": ctx.cmt_profile.to_dict()},
            "max_new_tokens": ctx.max_new_tokens, "stop_strings": list(ctx.cache.generation.stop_strings),
            "decoding": "greedy", "batch_size": ctx.batch_size, "timing_questions": ctx.timing_sample,
            "device": str(ctx.llm.device), "torch_threads": torch.get_num_threads(),
            "documents": len(ctx.docs), "questions": len(ctx.exs)}


def run_evaluation(
    llm: HFCausalLM, checkpoint: str | Path, test_docs: Sequence[dict[str, Any]], *,
    ablations: dict[str, str] | None = None, max_questions: int = 0, retention_docs: int = 200,
    retention_multiples: Sequence[int] = (1, 2, 5, 10), robustness_questions: int = 200, alpha: float | None = None,
    recency_margin: float | None = None, device: str = "cpu", progress: bool = True,
    prompt_profile: str | PromptProfile | None = None, cache_dir: str | Path | None = None,
    batch_size: int = BATCH_SIZE, max_new_tokens: int = MAX_NEW_TOKENS, rag_k: Sequence[int] = (1, 3),
    command: str | None = None, timing_questions: int = TIMING_QUESTIONS, rows: Sequence[str] = ROW_GROUPS,
) -> dict[str, Any]:
    """The full protocol on one test stream; returns the report dictionary. alpha, recency_margin and
    the prompt profile of the prompt-only rows default to the checkpoint's; cache_dir None = no disk cache.
    `rows` names the groups of rows to run (ROW_GROUPS; e.g. only "cmt" to compare a new checkpoint with
    a committed report's prompt-only rows)."""
    order = ("baselines", "rag", "cmt", "cmt-top", "ablations")
    unknown = set(rows) - set(order)
    if unknown:
        raise ValueError(f"unknown row groups {sorted(unknown)}; choose from {order}")
    t0 = time.perf_counter()
    ctx, _ = load_context(llm, checkpoint, test_docs, max_questions=max_questions, alpha=alpha,
                          recency_margin=recency_margin, prompt_profile=prompt_profile, cache_dir=cache_dir,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, timing_questions=timing_questions,
                          device=device, progress=progress)
    report = report_header(ctx, checkpoint, command)
    groups = {"baselines": lambda: baseline_rows(ctx), "rag": lambda: rag_rows(ctx, rag_k),
              "cmt": lambda: cmt_rows(ctx), "cmt-top": lambda: cmt_rows(ctx, whole_bank=False),
              "ablations": lambda: ablation_rows(ctx, ablations or {}, device)}
    report["rows"] = [row for group in order if group in rows for row in groups[group]()]
    report["cost"] = cost_section(ctx)
    report["examples"] = examples_section(ctx)
    report["retrieval"] = retrieval_recall(ctx.modules, ctx.docs, ctx.exs, ctx.bank)
    report["retention"] = retention_section(ctx, retention_docs, retention_multiples)
    report["robustness"] = robustness_section(ctx, robustness_questions)
    report["cache"] = {"dir": None if cache_dir is None else str(cache_dir), **ctx.cache.stats()}
    ctx.cache.close()
    report["seconds"] = time.perf_counter() - t0
    return report


def command_line(argv: Sequence[str] | None, program: str = "python -m trainer.evaluate") -> str:
    """The command as typed (argv None = this process's arguments)."""
    return f"{program} {shlex.join(sys.argv[1:] if argv is None else list(argv))}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", help="frozen LLM: directory, .gguf file, hub id or smollm2-135m-instruct "
                                      "(with --checkpoint: the local protocol rows)")
    parser.add_argument("--checkpoint")
    parser.add_argument("--service-url",
                        help="also (or only) measure the CMT row through a running service at this URL")
    parser.add_argument("--api-key", default=None, help="the service's write key (used for /documents and /ask)")
    parser.add_argument("--concurrency", type=int, default=8, help="questions in flight at once against the service")
    parser.add_argument("--data", default="synthetic:3000",
                        help='"synthetic[:entities]", "squad", "archivalqa" or a JSONL pattern with {split}')
    parser.add_argument("--split", default="test")
    parser.add_argument("--seed", type=int, default=0, help="synthetic stream seed (must match the training stream's)")
    parser.add_argument("--limit-docs", type=int, default=0)
    parser.add_argument("--max-questions", type=int, default=0,
                        help="ask only the first N questions of the stream (0 = all)")
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME=CHECKPOINT")
    parser.add_argument("--alpha", type=float, default=None, help="memory-aware decoding α (default: the checkpoint's)")
    parser.add_argument("--recency-margin", type=float, default=None,
                        help="newer reports within this key-score margin are selected first "
                             "(default: the checkpoint's)")
    parser.add_argument("--prompt-profile", choices=sorted(PROFILES), default=None,
                        help="profile of the prompt-only rows (no memory, gold, RAG); default: the checkpoint's")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="prediction cache of the prompt-only rows")
    parser.add_argument("--no-cache", action="store_true", help="keep predictions in memory only")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help="questions per LLM batch, the same in every row")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--timing-questions", type=int, default=TIMING_QUESTIONS,
                        help="every row answers its first N questions again, timed, without the cache "
                             "(0: time the answering pass)")
    parser.add_argument("--rows", default=",".join(ROW_GROUPS),
                        help=f"comma-separated groups of rows to run, of {ROW_GROUPS}")
    parser.add_argument("--retention-docs", type=int, default=200)
    parser.add_argument("--robustness-questions", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if bool(args.llm) != bool(args.checkpoint) or not (args.llm or args.service_url):
        parser.error("give --llm with --checkpoint (local protocol), --service-url, or both")
    command = command_line(argv)
    docs = load_source(args.data, args.split, seed=args.seed, limit=args.limit_docs or None)
    exs = examples(docs)[: args.max_questions or None]
    if args.llm:
        llm = HFCausalLM.from_pretrained(args.llm, device=args.device)
        ablations = dict(a.rsplit("=", 1) for a in args.ablation)
        report = run_evaluation(llm, args.checkpoint, docs, ablations=ablations, max_questions=args.max_questions,
                                retention_docs=args.retention_docs, robustness_questions=args.robustness_questions,
                                alpha=args.alpha, recency_margin=args.recency_margin, device=args.device,
                                prompt_profile=args.prompt_profile, cache_dir=None if args.no_cache else args.cache_dir,
                                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, command=command,
                                timing_questions=args.timing_questions, rows=[r for r in args.rows.split(",") if r])
    else:
        report = {"command": command, "documents": len(docs), "questions": len(exs), "rows": []}
    if args.service_url:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(base_url=args.service_url, headers=headers, timeout=300) as client:
            row = evaluate_service(client, docs, exs, concurrency=args.concurrency, max_new_tokens=args.max_new_tokens,
                                   recency_margin=args.recency_margin)
        report["rows"].append({k: v for k, v in row.items() if k != "predictions"})
    report["data"] = {"source": args.data, "split": args.split, "seed": args.seed}
    write_report(report, args.out, title=f"CMT evaluation: {args.data} {args.split}")
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
