"""The rows of the evaluation table, one function per family: baselines (no memory, gold paragraph),
RAG (top-k by BM25 and by the trained keys), CMT (top-k and the whole bank), ablations.

Every row asks the same frozen LLM, greedy, with the same batch size. Prompt-only rows use the
baseline prompt profile (the checkpoint's unless overridden) and the prediction cache; CMT rows use
the checkpoint's profile. Each row carries its scores (trainer.scoring: EM, F1, prefix-EM,
containment, answer words, each apart) and its cost: stored bytes per document, prompt (prefill)
positions per question and measured wall seconds per question.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from service.models.checkpoint import checkpoint_profile, load_checkpoint
from service.models.cmt import Bank, CMTModules
from service.models.llm import HFCausalLM
from service.models.prompts import PromptProfile
from trainer.data import QAExample
from trainer.eval_answer import (
    answer_cmt,
    compress_bank,
    prompt_text,
    question_tokens,
    run_prompts,
    time_prompts,
    whole_bank_k,
)
from trainer.eval_retrieval import bm25_index, bm25_search, key_top
from trainer.prediction_cache import PredictionCache
from trainer.scoring import aggregate

NO_MEMORY = "no memory"
GOLD = "gold paragraph in prompt (ceiling)"


@dataclass
class EvalContext:
    """Everything the rows share: the LLM, the checkpoint's modules, the stream and its bank."""

    llm: HFCausalLM
    modules: CMTModules
    docs: Sequence[dict[str, Any]]
    exs: Sequence[QAExample]
    bank: Bank
    cmt_profile: PromptProfile
    """The checkpoint's prompt profile: CMT rows."""
    cache: PredictionCache
    """Prompt-only rows: its profile is the baseline profile, its generation settings those of every row."""
    alpha: float
    top_k: int
    margin: float
    batch_size: int
    max_new_tokens: int
    progress: bool = True
    timing_questions: int = 32
    """Every row answers its first questions again, timed, in question order and without the cache
    (rounded up to whole batches; 0 = report the seconds of the answering pass itself)."""
    predictions: dict[str, list[str]] = field(default_factory=dict)
    """Row name → predictions, in question order."""
    timings: dict[str, float] = field(default_factory=dict)
    """One-off costs in seconds (Θ over the bank, the BM25 index)."""

    @property
    def baseline_profile(self) -> PromptProfile:
        return self.cache.profile

    @property
    def questions(self) -> list[str]:
        return [e.question for e in self.exs]

    def say(self, message: str) -> None:
        if self.progress:
            tqdm.write(message)

    @property
    def timing_sample(self) -> int:
        """Questions in the timing sample: timing_questions rounded up to whole batches, at most all."""
        if self.timing_questions <= 0:
            return 0
        return min(len(self.exs), math.ceil(self.timing_questions / self.batch_size) * self.batch_size)

    @property
    def cmt_bytes(self) -> int:
        """Payload stored per document: the fp16 memory, or its token picks (6 B each), and the fp16 key."""
        c = self.modules.config.compressor
        memory = c.num_memory_tokens * (c.stored_picks * 6 if c.stored_picks else c.memory_dim * 2)
        return memory + self.key_bytes

    @property
    def key_bytes(self) -> int:
        return self.modules.config.compressor.retrieval_key_dim * 2  # fp16

    @property
    def text_bytes(self) -> float:
        return sum(len(d["text"].encode()) for d in self.docs) / max(1, len(self.docs))


def make_row(ctx: EvalContext, name: str, preds: Sequence[str], **extra: Any) -> dict[str, Any]:
    """Scores of one row (and by question kind when the stream has several), plus its extra columns."""
    exs = ctx.exs
    ctx.predictions[name] = list(preds)
    r = aggregate(preds, [e.answers for e in exs])
    by_kind: dict[str, list[int]] = {}
    for i, e in enumerate(exs):
        by_kind.setdefault(e.kind, []).append(i)
    if len(by_kind) > 1:
        r["em_by_kind"] = {
            k: aggregate([preds[i] for i in ix], [exs[i].answers for i in ix])["em"] for k, ix in by_kind.items()
        }
    ctx.say(f"{name}: EM {r['em']:.1f} F1 {r['f1']:.1f} contains {r['containment']:.1f} words {r['answer_words']:.1f}")
    return {"row": name, **r, **extra}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def prompt_row(ctx: EvalContext, name: str, documents: Sequence[Sequence[str] | None], stored_bytes_per_doc: float,
               retrieval_seconds: float = 0.0, **extra: Any) -> dict[str, Any]:
    """A prompt-only row: documents[i] (None = none) then question i, through the cache.
    retrieval_seconds: per question, added to the generation seconds."""
    profile, tok = ctx.baseline_profile, ctx.llm.tokenizer
    prompts = [prompt_text(ctx.llm, profile, q, d, ctx.max_new_tokens)
               for q, d in zip(ctx.questions, documents, strict=True)]
    cut = sum(d is not None and p != profile.context_text(tok, q, d)
              for p, q, d in zip(prompts, ctx.questions, documents, strict=True))
    run = run_prompts(ctx.llm, prompts, ctx.cache, ctx.batch_size, desc=name, progress=ctx.progress)
    timing: dict[str, Any] = {"seconds_when_answered_per_question": _mean(run.seconds)}
    if ctx.timing_sample:
        n = ctx.timing_sample
        seconds, again = time_prompts(ctx.llm, prompts[:n], ctx.cache.generation, ctx.batch_size)
        timing |= {"generation_seconds_per_question": seconds / n,
                   "timing_sample_same_answers":
                       100.0 * sum(a == b for a, b in zip(again, run.predictions, strict=False)) / n,
                   "timing": f"the first {n} questions answered again now, in question order, without the cache"}
    else:
        timing |= {"generation_seconds_per_question": _mean(run.seconds),
                   "timing": "measured now" if not run.cached
                             else f"{run.cached} distinct prompts' seconds measured when they were cached"}
    return make_row(ctx, name, run.predictions, profile=profile.name, stored_bytes_per_doc=stored_bytes_per_doc,
                    prompt_tokens=_mean(run.prompt_tokens),
                    seconds_per_question=timing["generation_seconds_per_question"] + retrieval_seconds,
                    retrieval_seconds_per_question=retrieval_seconds, documents_cut=cut, computed=run.fresh,
                    cached=run.cached,
                    **timing, **extra)


# ---- the row families -----------------------------------------------------------------------------------


def baseline_rows(ctx: EvalContext) -> list[dict[str, Any]]:
    """The LLM alone, and with the gold paragraph in its prompt (the ceiling of every memory row)."""
    return [
        prompt_row(ctx, NO_MEMORY, [None] * len(ctx.exs), 0, family="baseline"),
        prompt_row(ctx, GOLD, [[e.document] for e in ctx.exs], ctx.text_bytes, family="baseline",
                   note="the paragraph that holds the answer, as raw text"),
    ]


def rag_rows(ctx: EvalContext, ks: Sequence[int] = (1, 3)) -> list[dict[str, Any]]:
    """Top-k retrieved documents as raw text (best first), by BM25 and by the trained CMT keys."""
    if not ks:
        return []
    texts = [d["text"] for d in ctx.docs]
    t = time.perf_counter()
    index = bm25_index(texts)
    ctx.timings["bm25_index_seconds"] = time.perf_counter() - t
    n = max(1, len(ctx.exs))
    t = time.perf_counter()
    bm25 = bm25_search(index, len(texts), ctx.questions, max(ks)).tolist() if ctx.exs else []
    bm25_s = (time.perf_counter() - t) / n
    t = time.perf_counter()
    with torch.inference_mode():
        q_keys = (torch.cat([ctx.modules.compressor.compress(ctx.questions[i : i + ctx.batch_size]).key.float().cpu()
                             for i in range(0, len(ctx.exs), ctx.batch_size)])
                  if ctx.exs else torch.empty(0, ctx.bank.keys.shape[1]))
    keyed = key_top(q_keys, ctx.bank, max(ks), ctx.margin) if ctx.exs else []
    key_s = (time.perf_counter() - t) / n
    rows = []
    for k in ks:
        rows.append(prompt_row(ctx, f"RAG top-{k} by BM25", [[texts[i] for i in top[:k]] for top in bm25],
                               ctx.text_bytes, retrieval_seconds=bm25_s, family="rag",
                               note="bm25s (k1 1.5, b 0.75) over the test stream; stored bytes: raw text "
                                    "(the index is extra)"))
    for k in ks:
        rows.append(prompt_row(ctx, f"RAG top-{k} by CMT keys", [[texts[i] for i in top[:k]] for top in keyed],
                               ctx.text_bytes + ctx.key_bytes, retrieval_seconds=key_s, family="rag",
                               note="the checkpoint's trained keys with its recency rule (CMT's own selection); "
                                    "retrieval time includes Θ(question)"))
    return rows


def _cmt_row(ctx: EvalContext, name: str, modules: CMTModules, bank: Bank, top_k: int | None, alpha: float,
             profile: PromptProfile, **extra: Any) -> dict[str, Any]:
    def answer(questions: Sequence[str], progress: bool) -> tuple[float, list[str]]:
        t = time.perf_counter()
        preds, _ = answer_cmt(modules, ctx.llm, bank, questions, top_k, alpha, ctx.batch_size, ctx.max_new_tokens,
                              profile, desc=name, progress=progress)
        return time.perf_counter() - t, preds

    seconds, preds = answer(ctx.questions, ctx.progress)
    timing: dict[str, Any] = {"seconds_when_answered_per_question": seconds / max(1, len(ctx.exs))}
    if ctx.timing_sample:
        n = ctx.timing_sample
        again_seconds, again = answer(ctx.questions[:n], False)
        timing |= {"seconds_per_question": again_seconds / n,
                   "timing_sample_same_answers": 100.0 * sum(a == b for a, b in zip(again, preds, strict=False)) / n,
                   "timing": f"the first {n} questions answered again now, in question order "
                             "(Θ(question), selection, ψ, π, generation)"}
    else:
        timing |= {"seconds_per_question": timing["seconds_when_answered_per_question"],
                   "timing": "measured now (Θ(question), selection, ψ, π and generation)"}
    prefix = modules.aligner.positions(ctx.llm)
    q_tokens = _mean(question_tokens(ctx.llm, profile, ctx.questions))
    return make_row(ctx, name, preds, profile=profile.name, stored_bytes_per_doc=ctx.cmt_bytes,
                    prompt_tokens=q_tokens + prefix, prompt_note=f"question tokens + {prefix} prefix positions",
                    **timing, **extra)


def cmt_rows(ctx: EvalContext, whole_bank: bool = True) -> list[dict[str, Any]]:
    """CMT with its top-k, and (whole_bank) over the whole bank MAC-style (all documents up to max_docs)."""
    a = ctx.modules.config.aggregator
    rerank = ""
    if ctx.modules.reranker is not None:
        sentences = min(a.rerank_sentence_candidates or a.rerank_candidates, a.rerank_candidates)
        rerank = (f", the best {a.rerank_candidates} re-ranked by their word pieces (BM25, w "
                  f"{a.rerank_lexical_weight:g}) then the best {sentences} by their sentences"
                  if a.rerank_lexical_weight > 0
                  else f", the best {a.rerank_candidates} re-ranked by their sentences")
    top = _cmt_row(ctx, f"CMT (top-{ctx.top_k})", ctx.modules, ctx.bank, ctx.top_k, ctx.alpha, ctx.cmt_profile,
                   family="cmt", note=f"α={ctx.alpha:g}, recency margin {ctx.margin:g}{rerank}")
    if not whole_bank:
        return [top]
    n, cap = len(ctx.bank.ids), ctx.modules.config.aggregator.max_docs
    k = whole_bank_k(ctx.modules, ctx.bank)
    if n <= cap:
        name, note = f"CMT over the whole bank ({n} docs, MAC-style)", "ψ attends over every stored document, no top-k"
    else:
        name = f"CMT over the {cap} best of {n} docs by key (MAC-style, capped)"
        note = (f"ψ holds at most max_docs={cap} documents (its order embeddings), so the 'whole bank' of {n} is cut "
                f"to the {cap} with the best key scores: top-k with k={cap}, not MAC's attention over all {n}")
    if k == min(ctx.top_k, n):
        whole = {**top, "row": name,
                 "note": note + f"; the same selection as the CMT top-{ctx.top_k} row, not recomputed"}
        ctx.predictions[name] = ctx.predictions[top["row"]]
    else:
        whole = _cmt_row(ctx, name, ctx.modules, ctx.bank, None, ctx.alpha, ctx.cmt_profile, family="cmt", note=note)
    return [top, whole]


def trained_with_top_k(train_config: dict[str, Any]) -> bool:
    """Whether a checkpoint was trained with top-k selection: the objective's switch (nested since the
    trainer holds the objective's own config), or the flat field of checkpoints written before."""
    return bool(train_config.get("objective", {}).get("use_top_k", train_config.get("use_top_k", True)))


def ablation_rows(ctx: EvalContext, ablations: dict[str, str], device: str = "cpu") -> list[dict[str, Any]]:
    """One CMT row per ablation checkpoint, each with its own α, top-k switch and prompt profile."""
    rows = []
    for name, path in ablations.items():
        modules, config = load_checkpoint(path, ctx.llm.identity, ctx.llm.layout, device=device)
        alpha = config["metrics"].get("alpha", 0.0)
        use_top_k = trained_with_top_k(config["metrics"].get("train_config", {}))
        top_k = modules.config.aggregator.top_k if use_top_k else None
        rows.append(_cmt_row(ctx, f"CMT ablation: {name}", modules, compress_bank(modules, ctx.docs), top_k, alpha,
                             checkpoint_profile(config), checkpoint=str(path), family="ablation",
                             note=f"α={alpha:g}, " + (f"top-{top_k}" if top_k else "whole bank up to max_docs")))
    return rows


def examples_section(ctx: EvalContext, n: int = 12) -> list[dict[str, Any]]:
    """The first n questions with the answers of the main rows."""
    shown = [r for r in (NO_MEMORY, GOLD, "RAG top-1 by BM25", f"CMT (top-{ctx.top_k})") if r in ctx.predictions]
    return [{"question": e.question, "gold": e.answers, "answers": {r: ctx.predictions[r][i] for r in shown}}
            for i, e in enumerate(ctx.exs[:n])]
