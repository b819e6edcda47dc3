"""Sections of the evaluation beyond the row table: knowledge retention as the stream grows and
robustness to irrelevant documents (both CMT, with the checkpoint's top-k, α and prompt profile),
and the cost of storing a document."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from service.models.cmt import Bank
from trainer.data import examples
from trainer.eval_answer import answer_cmt
from trainer.eval_rows import EvalContext
from trainer.scoring import aggregate


def _cmt_scores(ctx: EvalContext, bank: Bank, exs: Sequence[Any], desc: str) -> dict[str, float]:
    preds, _ = answer_cmt(ctx.modules, ctx.llm, bank, [e.question for e in exs], ctx.top_k, ctx.alpha, ctx.batch_size,
                          ctx.max_new_tokens, ctx.cmt_profile, desc=desc, progress=ctx.progress)
    return aggregate(preds, [e.answers for e in exs])


def _sub_bank(bank: Bank, rows: Sequence[int]) -> Bank:
    rows = list(rows)
    picks = None if bank.picks is None else (bank.picks[0][rows], bank.picks[1][rows])
    return Bank(bank.memories[rows], bank.keys[rows], bank.timestamps[rows], [bank.ids[i] for i in rows], picks,
                [bank.texts[i] for i in rows] if bank.texts else [])


def cost_section(ctx: EvalContext) -> dict[str, Any]:
    """Bytes per stored document (CMT memory, raw text, a full KV cache) and the one-off seconds."""
    layout = ctx.llm.layout
    doc_tokens = sum(len(ctx.llm.tokenizer(d["text"])["input_ids"]) for d in ctx.docs) / max(1, len(ctx.docs))
    return {"cmt_memory_bytes_per_doc_fp16": ctx.cmt_bytes, "raw_text_bytes_per_doc": ctx.text_bytes,
            "full_kv_cache_bytes_per_doc_fp16": doc_tokens * layout.values_per_position * 2,
            "llm_tokens_per_doc": doc_tokens,
            **{k: v for k, v in ctx.timings.items()}}


def retention_section(
    ctx: EvalContext, retention_docs: int = 200, multiples: Sequence[int] = (1, 2, 5, 10)
) -> dict[str, Any]:
    """Questions of the first `retention_docs` question-bearing documents as the bank grows: multiples
    of the stream up to the last of those documents, then the whole stream."""
    docs = ctx.docs
    first_docs = [d for d in docs if d.get("questions")][:retention_docs]
    first_pos = docs.index(first_docs[-1]) + 1 if first_docs else 0
    first_ex = examples(first_docs)
    curve: list[dict[str, Any]] = []
    for n in sorted({min(len(docs), m * first_pos) for m in multiples} | {len(docs)}) if first_pos else []:
        curve.append(
            {"bank_docs": n, **_cmt_scores(ctx, _sub_bank(ctx.bank, range(n)), first_ex, f"retention @ {n} docs")}
        )
        ctx.say(f"retention @ {n} docs: EM {curve[-1]['em']:.1f}")
    return {"first_question_docs": len(first_docs), "first_stream_docs": first_pos, "questions": len(first_ex),
            "curve": curve, "growth": curve[-1]["bank_docs"] / first_pos if curve else None,
            "em_drop": (curve[0]["em"] - curve[-1]["em"]) if curve else None}


def irrelevant_pool(docs: Sequence[dict[str, Any]], question_docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Documents that cannot answer any of question_docs' questions (other entities, no questions asked)."""
    ids = {d["doc_id"] for d in question_docs}
    entities = {d.get("entity") for d in question_docs if d.get("entity")}
    return [d for d in docs if d["doc_id"] not in ids and (d.get("entity") is None or d["entity"] not in entities)]


def robustness_section(ctx: EvalContext, robustness_questions: int = 200) -> list[dict[str, Any]]:
    """Irrelevant documents as a share of the bank, 0-100% (100% = the gold documents are absent);
    robustness_questions 0 skips the section."""
    if robustness_questions <= 0:
        return []
    q_docs = [d for d in ctx.docs if d.get("questions")][:robustness_questions]
    pool = irrelevant_pool(ctx.docs, q_docs)
    rob_ex = examples(q_docs)
    index = {d: i for i, d in enumerate(ctx.bank.ids)}
    out = []
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        if share == 1.0:
            n_irr = min(len(pool), len(q_docs) * 3)
        else:
            n_irr = min(len(pool), round(len(q_docs) * share / (1 - share)))
        chosen = (([] if share == 1.0 else [index[d["doc_id"]] for d in q_docs])
                  + [index[d["doc_id"]] for d in random.Random(0).sample(pool, n_irr)])
        chosen.sort()  # keep stream order
        scores = _cmt_scores(ctx, _sub_bank(ctx.bank, chosen), rob_ex, f"robustness {share:.0%}")
        out.append({"irrelevant_share": share, "actual_share": n_irr / max(1, len(chosen)), "bank_docs": len(chosen),
                    **scores})
        ctx.say(f"robustness {share:.0%}: EM {out[-1]['em']:.1f}")
    return out
