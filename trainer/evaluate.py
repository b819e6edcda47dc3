"""Streamed evaluation of CMT against no-memory and RAG baselines, with the same frozen LLM.

    python -m trainer.evaluate --llm runs/llm --checkpoint runs/cmt/best --data synthetic --out runs/eval \
        [--ablation no_alpha=runs/abl_alpha/best ...]

The test documents are streamed (in date order) into an in-memory `Bank`, then every question is
asked. Rows: no memory; gold document as raw text in the prompt (RAG upper bound); top-1 retrieved
document (by the checkpoint's trained keys) as raw text (RAG); CMT; one CMT row per ablation.
Scores: official SQuAD EM/F1 and, apart, the papers' prefix-EM. Cost columns: stored bytes per
document and prompt (prefill) positions per question. Also: retention of the first documents'
answers as the stream grows, robustness to irrelevant documents, retrieval recall@1/@5 of the
trained keys against the untrained MiniLM mean-pooled embedding and BM25.
Writes <out>/report.json, <out>/report.md and PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bm25s
import httpx
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from service.models.aggregator import select_top_k, select_top_k_recent
from service.models.checkpoint import load_checkpoint
from service.models.cmt import Bank, CMTModules, CMTPipeline
from service.models.llm import GenerationConfig, HFCausalLM
from service.models.prompts import PROFILES
from trainer.data import (
    QAExample,
    examples,
    load_source,
    timestamp,
)
from trainer.scoring import aggregate, normalize_answer
from trainer.service_eval import evaluate_service

MAX_NEW_TOKENS = 16


# ---- answering -----------------------------------------------------------------------------------------


def compress_bank(modules: CMTModules, docs: Sequence[dict[str, Any]], batch_size: int = 64) -> Bank:
    """Θ over every document, in stream order; timestamps from the dates (else the stream position)."""
    modules.eval()
    mem, keys = [], []
    for i in range(0, len(docs), batch_size):
        c = modules.compressor.compress([d["text"] for d in docs[i : i + batch_size]])
        mem.append(c.memory.float().cpu())
        keys.append(c.key.float().cpu())
    times = [timestamp(d.get("date")) or float(i) for i, d in enumerate(docs)]
    return Bank(torch.cat(mem), torch.cat(keys), torch.tensor(times, dtype=torch.float64), [d["doc_id"] for d in docs])


def generation_config(alpha: float = 0.0, max_new_tokens: int = MAX_NEW_TOKENS) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, alpha=alpha, stop_strings=("\n",))


def answer_cmt(
    modules: CMTModules, llm: HFCausalLM, bank: Bank, questions: Sequence[str], top_k: int | None, alpha: float = 0.0,
    batch_size: int = 64, max_new_tokens: int = MAX_NEW_TOKENS,
) -> tuple[list[str], list[list[str]]]:
    """CMT answers and the selected document ids. top_k None = the whole bank (up to max_docs)."""
    pipeline = CMTPipeline(modules, llm)
    k = top_k or min(max(1, len(bank.ids)), modules.config.aggregator.max_docs)
    bank = Bank(bank.memories.to(modules.device), bank.keys.to(modules.device), bank.timestamps, bank.ids)
    preds, sources = [], []
    for i in range(0, len(questions), batch_size):
        for a in pipeline.answer(list(questions[i : i + batch_size]), bank, top_k=k, generation=generation_config(alpha, max_new_tokens)):
            preds.append(a.text)
            sources.append(a.source_ids)
    return preds, sources


def fit_prompt(llm: HFCausalLM, question: str, document: str | None) -> str:
    """The no-memory or RAG prompt; a document too long for the LLM's positions is cut at its end."""
    if document is None:
        return PROFILES["plain"].question_prompt(question)
    limit = (llm.layout.max_positions or 10**9) - MAX_NEW_TOKENS - 2
    prompt = PROFILES["plain"].context_prompt(question, [document])
    n = len(llm.tokenizer(prompt)["input_ids"])
    if n <= limit:
        return prompt
    ids = llm.tokenizer(document)["input_ids"]
    keep = max(1, len(ids) - (n - limit) - 2)
    return PROFILES["plain"].context_prompt(question, [llm.tokenizer.decode(ids[:keep])])


def answer_prompts(llm: HFCausalLM, prompts: Sequence[str], batch_size: int = 64) -> tuple[list[str], list[int]]:
    preds, lengths = [], []
    for i in range(0, len(prompts), batch_size):
        for g in llm.generate(list(prompts[i : i + batch_size]), config=generation_config()):
            preds.append(g.text)
            lengths.append(g.prompt_tokens)
    return preds, lengths


def evaluate_cmt(
    modules: CMTModules, llm: HFCausalLM, docs: Sequence[dict[str, Any]], exs: Sequence[QAExample],
    alpha: float = 0.0, top_k: int | None = 4, bank: Bank | None = None,
) -> dict[str, Any]:
    """Stream docs into a bank, ask the examples' questions; EM/F1/prefix-EM and recall@1 (× 100)."""
    was_training = modules.training
    bank = bank if bank is not None else compress_bank(modules, docs)
    preds, sources = answer_cmt(modules, llm, bank, [e.question for e in exs], top_k, alpha)
    modules.train(was_training)
    result = aggregate(preds, [e.answers for e in exs])
    # recall@1 by key score (sources are reordered newest first, so recompute the top-1)
    q = modules.compressor.compress([e.question for e in exs]) if exs else None
    if exs:
        sel = select_top_k(q.key.float().cpu(), bank.keys, 1)
        top1 = [bank.ids[i] for i in sel.indices[:, 0].tolist()]
        result["recall_at_1"] = 100.0 * sum(t == e.doc_id for t, e in zip(top1, exs)) / len(exs)
    else:
        result["recall_at_1"] = 0.0
    result["predictions"] = preds
    result["sources"] = sources
    return result


# ---- retrieval baselines ----------------------------------------------------------------------------


def bm25_top(texts: Sequence[str], queries: Sequence[str], k: int) -> torch.Tensor:
    """Indices (Q, k) of the k best texts per query by BM25 (bm25s, Lucene variant) over SQuAD-normalised words."""
    retriever = bm25s.BM25(k1=1.5, b=0.75)
    retriever.index([normalize_answer(t).split() for t in texts], show_progress=False)
    top, _ = retriever.retrieve([normalize_answer(q).split() or [""] for q in queries], k=min(k, len(texts)), show_progress=False)
    return torch.as_tensor(top)


def _recall(scores_or_top: torch.Tensor, gold: Sequence[int], ks: Sequence[int] = (1, 5), ranked: bool = False) -> dict[str, float]:
    """Recall@k of the gold index, from a (Q, N) score matrix or, when ranked, from (Q, K) best indices."""
    top = scores_or_top if ranked else scores_or_top.topk(min(max(ks), scores_or_top.shape[1]), dim=1).indices  # (Q, K)
    g = torch.tensor(gold)[:, None]
    return {f"recall_at_{k}": 100.0 * (top[:, :k] == g).any(dim=1).float().mean().item() for k in ks}


@torch.inference_mode()
def retrieval_recall(modules: CMTModules, docs: Sequence[dict[str, Any]], exs: Sequence[QAExample], bank: Bank) -> dict[str, dict[str, float]]:
    """Recall@1/@5 of the gold document: trained keys (by score, and with the checkpoint's recency rule
    when it has one), untrained MiniLM mean-pooled, BM25."""
    index = {d: i for i, d in enumerate(bank.ids)}
    gold = [index[e.doc_id] for e in exs]
    questions = [e.question for e in exs]
    q = modules.compressor.compress(questions).key.float().cpu()
    out = {"cmt_keys": _recall(q @ bank.keys.float().T, gold)}
    margin = modules.config.aggregator.recency_margin
    if margin > 0:
        picked = select_top_k_recent(q, bank.keys.float(), bank.timestamps, 5, margin).indices  # (Q, 5)
        out[f"cmt_keys_recency_margin_{margin:g}"] = _recall(picked, gold, ranked=True)

    backbone, tok = modules.compressor.backbone, modules.compressor.tokenizer

    def pooled(texts: Sequence[str]) -> torch.Tensor:
        parts = []
        for i in range(0, len(texts), 64):
            enc = tok(list(texts[i : i + 64]), truncation=True, max_length=256, padding=True, return_tensors="pt").to(modules.device)
            h = backbone(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].to(h)
            parts.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1).float().cpu())
        return torch.cat(parts)

    out["minilm_mean_pooled_untrained"] = _recall(pooled(questions) @ pooled([d["text"] for d in docs]).T, gold)
    out["bm25"] = _recall(bm25_top([d["text"] for d in docs], questions, 5), gold, ranked=True)
    return out


# ---- the protocol ----------------------------------------------------------------------------------------


def _row(name: str, preds: Sequence[str], exs: Sequence[QAExample], **extra: Any) -> dict[str, Any]:
    r = aggregate(preds, [e.answers for e in exs])
    by_kind: dict[str, list[int]] = {}
    for i, e in enumerate(exs):
        by_kind.setdefault(e.kind, []).append(i)
    if len(by_kind) > 1:
        r["em_by_kind"] = {k: aggregate([preds[i] for i in ix], [exs[i].answers for i in ix])["em"] for k, ix in by_kind.items()}
    return {"row": name, **r, **extra}


def irrelevant_pool(docs: Sequence[dict[str, Any]], question_docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Documents that cannot answer any of question_docs' questions (other entities, no questions asked)."""
    ids = {d["doc_id"] for d in question_docs}
    entities = {d.get("entity") for d in question_docs if d.get("entity")}
    return [d for d in docs if d["doc_id"] not in ids and (d.get("entity") is None or d["entity"] not in entities)]


def run_evaluation(
    llm: HFCausalLM, checkpoint: str | Path, test_docs: Sequence[dict[str, Any]], *, ablations: dict[str, str] | None = None,
    max_questions: int = 0, retention_docs: int = 200, retention_multiples: Sequence[int] = (1, 2, 5, 10),
    robustness_questions: int = 200, alpha: float | None = None, recency_margin: float | None = None, device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """The full protocol on one test stream; returns the report dictionary. alpha and recency_margin
    default to the checkpoint's."""
    t0 = time.perf_counter()
    modules, ckpt = load_checkpoint(checkpoint, llm.identity, llm.layout, device=device)
    alpha = ckpt["metrics"].get("alpha", 0.0) if alpha is None else alpha
    if recency_margin is not None:
        modules.config.aggregator = dataclasses.replace(modules.config.aggregator, recency_margin=recency_margin)
    margin = modules.config.aggregator.recency_margin
    top_k = modules.config.aggregator.top_k
    exs = examples(test_docs)
    if max_questions:
        exs = exs[:max_questions]
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "llm": llm.identity.name_or_path, "alpha": alpha, "top_k": top_k,
                              "recency_margin": margin,
                              "documents": len(test_docs), "questions": len(exs), "rows": []}
    say = tqdm.write if progress else (lambda *_: None)
    bank = compress_bank(modules, test_docs)
    docs_by_id = {d["doc_id"]: d for d in test_docs}
    layout = llm.layout
    k, d_m = modules.config.compressor.num_memory_tokens, modules.config.compressor.memory_dim
    cmt_bytes = (k * d_m + d_m) * 2  # fp16 memory + key
    text_bytes = sum(len(d["text"].encode()) for d in test_docs) / len(test_docs)
    doc_tokens = sum(len(llm.tokenizer(d["text"])["input_ids"]) for d in test_docs) / len(test_docs)
    kv_bytes = doc_tokens * layout.values_per_position * 2
    report["cost"] = {"cmt_memory_bytes_per_doc_fp16": cmt_bytes, "raw_text_bytes_per_doc": text_bytes,
                      "full_kv_cache_bytes_per_doc_fp16": kv_bytes, "llm_tokens_per_doc": doc_tokens}

    questions = [e.question for e in exs]
    none_preds, none_len = answer_prompts(llm, [fit_prompt(llm, q, None) for q in questions])
    report["rows"].append(_row("no memory", none_preds, exs, stored_bytes_per_doc=0, prompt_tokens=sum(none_len) / len(exs)))
    say(f"no memory: {report['rows'][-1]['em']:.1f}")
    gold_preds, gold_len = answer_prompts(llm, [fit_prompt(llm, e.question, e.document) for e in exs])
    report["rows"].append(_row("gold doc in prompt (RAG upper bound)", gold_preds, exs, stored_bytes_per_doc=text_bytes, prompt_tokens=sum(gold_len) / len(exs)))
    say(f"gold RAG: {report['rows'][-1]['em']:.1f}")
    q_keys = modules.compressor.compress(questions).key.float().cpu() if exs else torch.empty(0)
    top1 = select_top_k_recent(q_keys, bank.keys, bank.timestamps, 1, margin).indices[:, 0].tolist()  # CMT's own selection
    rag_preds, rag_len = answer_prompts(llm, [fit_prompt(llm, e.question, docs_by_id[bank.ids[i]]["text"]) for e, i in zip(exs, top1)])
    report["rows"].append(_row("retrieved top-1 doc in prompt (RAG, CMT keys)", rag_preds, exs, stored_bytes_per_doc=text_bytes + d_m * 2,
                               prompt_tokens=sum(rag_len) / len(exs)))
    say(f"top-1 RAG: {report['rows'][-1]['em']:.1f}")
    cmt_preds, _ = answer_cmt(modules, llm, bank, questions, top_k, alpha)
    prefix_positions = modules.config.aligner.prefix_len
    report["rows"].append(_row("CMT", cmt_preds, exs, stored_bytes_per_doc=cmt_bytes, prompt_tokens=sum(none_len) / len(exs) + prefix_positions,
                               prompt_note=f"question tokens + {prefix_positions} prefix positions"))
    say(f"CMT: {report['rows'][-1]['em']:.1f}")
    report["examples"] = [
        {"question": e.question, "gold": e.answers, "no_memory": a, "gold_rag": b, "cmt": c}
        for e, a, b, c in list(zip(exs, none_preds, gold_preds, cmt_preds))[:12]
    ]
    report["retrieval"] = retrieval_recall(modules, test_docs, exs, bank)

    for name, path in (ablations or {}).items():
        abl, abl_cfg = load_checkpoint(path, llm.identity, llm.layout, device=device)
        abl_alpha = abl_cfg["metrics"].get("alpha", 0.0)
        use_top_k = abl_cfg["metrics"].get("train_config", {}).get("use_top_k", True)
        preds, _ = answer_cmt(abl, llm, compress_bank(abl, test_docs), questions, abl.config.aggregator.top_k if use_top_k else None, abl_alpha)
        report["rows"].append(_row(f"CMT ablation: {name}", preds, exs, stored_bytes_per_doc=cmt_bytes,
                                   prompt_tokens=sum(none_len) / len(exs) + abl.config.aligner.prefix_len))
        say(f"ablation {name}: {report['rows'][-1]['em']:.1f}")

    # retention: questions of the first `retention_docs` question-bearing documents as the stream grows
    first_docs = [d for d in test_docs if d.get("questions")][:retention_docs]
    first_pos = test_docs.index(first_docs[-1]) + 1 if first_docs else 0
    first_ex = examples(first_docs)
    curve: list[dict[str, Any]] = []
    # bank sizes: multiples of the documents streamed up to the last of those question documents, then the whole stream
    for n in sorted({min(len(test_docs), m * first_pos) for m in retention_multiples} | {len(test_docs)}) if first_pos else []:
        sub = Bank(bank.memories[:n], bank.keys[:n], bank.timestamps[:n], bank.ids[:n])
        preds, _ = answer_cmt(modules, llm, sub, [e.question for e in first_ex], top_k, alpha)
        curve.append({"bank_docs": n, **aggregate(preds, [e.answers for e in first_ex])})
        say(f"retention @ {n} docs: {curve[-1]['em']:.1f}")
    report["retention"] = {"first_question_docs": len(first_docs), "first_stream_docs": first_pos, "questions": len(first_ex),
                           "curve": curve, "growth": curve[-1]["bank_docs"] / first_pos if curve else None,
                           "em_drop": (curve[0]["em"] - curve[-1]["em"]) if curve else None}

    # robustness: irrelevant documents as a share of the stream
    q_docs = [d for d in test_docs if d.get("questions")][:robustness_questions]
    pool = irrelevant_pool(test_docs, q_docs)
    rob_ex = examples(q_docs)
    index = {d: i for i, d in enumerate(bank.ids)}
    rob = []
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        n_irr = len(pool) if share == 1.0 else min(len(pool), round(len(q_docs) * share / (1 - share)))
        if share == 1.0:
            n_irr = min(len(pool), len(q_docs) * 3)
        chosen = ([] if share == 1.0 else [index[d["doc_id"]] for d in q_docs]) + [index[d["doc_id"]] for d in random.Random(0).sample(pool, n_irr)]
        chosen.sort()  # keep stream order
        sub = Bank(bank.memories[chosen], bank.keys[chosen], bank.timestamps[chosen], [bank.ids[i] for i in chosen])
        preds, _ = answer_cmt(modules, llm, sub, [e.question for e in rob_ex], top_k, alpha)
        actual = n_irr / max(1, len(chosen))
        rob.append({"irrelevant_share": share, "actual_share": actual, "bank_docs": len(chosen), **aggregate(preds, [e.answers for e in rob_ex])})
        say(f"robustness {share:.0%}: {rob[-1]['em']:.1f}")
    report["robustness"] = rob
    report["seconds"] = time.perf_counter() - t0
    return report


# ---- output ----------------------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def write_report(report: dict[str, Any], out: str | Path, title: str = "CMT evaluation") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# {title}", "", (f"LLM `{report.get('llm', 'served')}`, checkpoint `{report.get('checkpoint', 'served')}`, "
             f"α={report.get('alpha', 'served')}, top-k={report.get('top_k', 'served')}, "
             f"recency margin={report.get('recency_margin', 'served')}; "
             f"{report['documents']} documents, {report['questions']} questions. EM/F1: official SQuAD v1.1 scoring. "
             "Prefix-EM (prediction cut to the shortest gold's length) is the looser metric of the CMT/MAC papers, reported apart."), "",
             "| row | EM | F1 | prefix-EM (papers) | stored bytes/doc | prompt positions/question |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['row']} | {r['em']:.2f} | {r['f1']:.2f} | {r['prefix_em']:.2f} | {r['stored_bytes_per_doc']:.0f} | {_num(r['prompt_tokens'])} |")
    for r in report["rows"]:
        if "ingest" in r:
            i, lat = r["ingest"], r["ask_latency_ms"]
            lines += ["", (f"{r['row']}: {i['documents']} documents streamed at {i['docs_per_s']:.1f} docs/s ({i['status']}); "
                           f"/ask latency p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms.")]
    kinds = [r for r in report["rows"] if "em_by_kind" in r]
    if kinds:
        names = sorted(kinds[0]["em_by_kind"])
        lines += ["", "EM by question kind (single = answer in one document; latest = a newer report supersedes an older one):", "",
                  "| row | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {r['row']} | " + " | ".join(f"{r['em_by_kind'].get(n, 0):.1f}" for n in names) + " |" for r in kinds]
    c = report.get("cost")
    lines += [] if c is None else ["", (f"Cost: CMT memory {c['cmt_memory_bytes_per_doc_fp16']:.0f} B/doc (fp16, memory + key) vs raw text {c['raw_text_bytes_per_doc']:.0f} B "
              f"vs a full KV cache of the document {c['full_kv_cache_bytes_per_doc_fp16'] / 1024:.1f} KiB ({c['llm_tokens_per_doc']:.1f} LLM tokens/doc).")]
    if "retrieval" in report:
        lines += ["", "| retrieval (gold document) | recall@1 | recall@5 |", "|---|---:|---:|"]
        lines += [f"| {n} | {v['recall_at_1']:.1f} | {v['recall_at_5']:.1f} |" for n, v in report["retrieval"].items()]
    ret = report.get("retention")
    if ret and ret["curve"]:
        lines += ["", (f"Retention: questions of the first {ret['first_question_docs']} question documents ({ret['questions']} questions) as the bank grows; "
                  f"they sit in the first {ret.get('first_stream_docs', '?')} documents of the stream; the bank grows {ret.get('growth') or 0:.1f}x; "
                  f"EM drop {ret['em_drop']:.2f} points."), "", "| bank documents | EM | F1 |", "|---:|---:|---:|"]
        lines += [f"| {p['bank_docs']} | {p['em']:.2f} | {p['f1']:.2f} |" for p in ret["curve"]]
    if report.get("robustness"):
        lines += ["", "Robustness: share of irrelevant documents in the bank (100% = the gold documents are absent).", "",
                  "| irrelevant share | bank documents | EM | F1 |", "|---:|---:|---:|---:|"]
        lines += [f"| {p['irrelevant_share']:.0%} | {p['bank_docs']} | {p['em']:.2f} | {p['f1']:.2f} |" for p in report["robustness"]]
    if report.get("examples"):
        lines += ["", "Examples:", "", "| question | gold | no memory | gold RAG | CMT |", "|---|---|---|---|---|"]
        lines += [f"| {e['question']} | {e['gold'][0]} | {e['no_memory']} | {e['gold_rag']} | {e['cmt']} |" for e in report["examples"]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(report, out)
    return out


def plot(report: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional; the JSON and Markdown carry the numbers
        return
    ret = report.get("retention")
    if ret and ret["curve"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([p["bank_docs"] for p in ret["curve"]], [p["em"] for p in ret["curve"]], "o-", label="CMT EM")
        ax.set_xscale("log")
        ax.set_xlabel("documents in the bank")
        ax.set_ylabel(f"EM on the first {ret['first_question_docs']} docs' questions")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "retention.png", dpi=120)
        plt.close(fig)
    if report.get("robustness"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [100 * p["irrelevant_share"] for p in report["robustness"]]
        ax.plot(xs, [p["em"] for p in report["robustness"]], "o-", label="CMT")
        none = next((r["em"] for r in report["rows"] if r["row"] == "no memory"), None)
        if none is not None:
            ax.axhline(none, color="grey", ls="--", label="no memory")
        ax.set_xlabel("irrelevant documents (% of the bank)")
        ax.set_ylabel("EM")
        ax.set_ylim(0, 100)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "robustness.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    rows = report["rows"]
    ax.barh([r["row"] for r in rows][::-1], [r["em"] for r in rows][::-1])
    ax.set_xlabel("EM (official SQuAD)")
    fig.tight_layout()
    fig.savefig(out / "rows.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", help="frozen LLM: directory, .gguf file, hub id or smollm2-135m-instruct (with --checkpoint: the local protocol rows)")
    parser.add_argument("--checkpoint")
    parser.add_argument("--service-url", help="also (or only) measure the CMT row through a running service at this URL")
    parser.add_argument("--api-key", default=None, help="the service's write key (used for /documents and /ask)")
    parser.add_argument("--concurrency", type=int, default=8, help="questions in flight at once against the service")
    parser.add_argument("--data", default="synthetic:3000", help='"synthetic[:entities]", "squad", "archivalqa" or a JSONL pattern with {split}')
    parser.add_argument("--split", default="test")
    parser.add_argument("--seed", type=int, default=0, help="synthetic stream seed (must match the training stream's)")
    parser.add_argument("--limit-docs", type=int, default=0)
    parser.add_argument("--max-questions", type=int, default=0)
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME=CHECKPOINT")
    parser.add_argument("--alpha", type=float, default=None, help="memory-aware decoding α (default: the checkpoint's)")
    parser.add_argument("--recency-margin", type=float, default=None,
                        help="newer reports within this key-score margin are selected first (default: the checkpoint's)")
    parser.add_argument("--retention-docs", type=int, default=200)
    parser.add_argument("--robustness-questions", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if bool(args.llm) != bool(args.checkpoint) or not (args.llm or args.service_url):
        parser.error("give --llm with --checkpoint (local protocol), --service-url, or both")
    docs = load_source(args.data, args.split, seed=args.seed, limit=args.limit_docs or None)
    exs = examples(docs)[: args.max_questions or None]
    if args.llm:
        llm = HFCausalLM.from_pretrained(args.llm, device=args.device)
        ablations = dict(a.split("=", 1) for a in args.ablation)
        report = run_evaluation(llm, args.checkpoint, docs, ablations=ablations, max_questions=args.max_questions,
                                retention_docs=args.retention_docs, robustness_questions=args.robustness_questions,
                                alpha=args.alpha, recency_margin=args.recency_margin, device=args.device)
    else:
        report = {"documents": len(docs), "questions": len(exs), "rows": []}
    if args.service_url:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(base_url=args.service_url, headers=headers, timeout=300) as client:
            row = evaluate_service(client, docs, exs, concurrency=args.concurrency, max_new_tokens=MAX_NEW_TOKENS,
                                   recency_margin=args.recency_margin)
        report["rows"].append({k: v for k, v in row.items() if k != "predictions"})
    report["data"] = {"source": args.data, "split": args.split, "seed": args.seed}
    write_report(report, args.out, title=f"CMT evaluation: {args.data} {args.split}")
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
