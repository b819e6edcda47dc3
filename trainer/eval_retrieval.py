"""Retrieval for the evaluation: BM25 (bm25s) and the trained CMT keys, as RAG selections and as
recall@k of the gold document."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bm25s
import torch
import torch.nn.functional as F

from service.models.aggregator import select_top_k_recent
from service.models.cmt import Bank, CMTModules
from service.models.compressor import Compressor
from trainer.data import QAExample
from trainer.scoring import normalize_answer


def bm25_index(texts: Sequence[str]) -> bm25s.BM25:
    """A BM25 index (bm25s, Lucene variant, k1 1.5, b 0.75) over SQuAD-normalised words."""
    retriever = bm25s.BM25(k1=1.5, b=0.75)
    retriever.index([normalize_answer(t).split() for t in texts], show_progress=False)
    return retriever


def bm25_search(retriever: bm25s.BM25, num_texts: int, queries: Sequence[str], k: int) -> torch.Tensor:
    """Indices (Q, min(k, N)) of the best texts per query, best first."""
    top, _ = retriever.retrieve(
        [normalize_answer(q).split() or [""] for q in queries], k=min(k, num_texts), show_progress=False
    )
    return torch.as_tensor(top)


def bm25_top(texts: Sequence[str], queries: Sequence[str], k: int) -> torch.Tensor:
    """Indices (Q, k) of the k best texts per query by BM25 over SQuAD-normalised words."""
    return bm25_search(bm25_index(texts), len(texts), queries, k)


def key_top(q_keys: torch.Tensor, bank: Bank, k: int, margin: float) -> list[list[int]]:
    """Bank rows of the k best documents per question by the trained keys, with the checkpoint's
    recency rule (as CMT selects them), best first; fewer when the bank is smaller."""
    sel = select_top_k_recent(q_keys, bank.keys.float(), bank.timestamps, k, margin)
    return [[i for i in row if i >= 0] for row in sel.indices.tolist()]


def _recall(
    scores_or_top: torch.Tensor, gold: Sequence[int], ks: Sequence[int] = (1, 5), ranked: bool = False
) -> dict[str, float]:
    """Recall@k of the gold index, from a (Q, N) score matrix or, when ranked, from (Q, K) best indices."""
    top = scores_or_top if ranked else scores_or_top.topk(min(max(ks), scores_or_top.shape[1]), dim=1).indices  # (Q, K)
    g = torch.tensor(gold)[:, None]
    return {f"recall_at_{k}": 100.0 * (top[:, :k] == g).any(dim=1).float().mean().item() for k in ks}


def key_part_recall(compressor: Compressor, q_keys: torch.Tensor, d_keys: torch.Tensor,
                    gold: Sequence[int]) -> dict[str, dict[str, float]]:
    """Recall of each part of a [dense (d_s) ; lexical] key alone (empty without a key encoder)."""
    if compressor.key_encoder is None:
        return {}
    d_s = compressor.key_encoder.width
    out = {"cmt_keys_dense_part_only": _recall(q_keys[:, :d_s] @ d_keys[:, :d_s].T, gold)}
    if compressor.lexical_key is not None:
        out["cmt_keys_lexical_part_only"] = _recall(q_keys[:, d_s:] @ d_keys[:, d_s:].T, gold)
    return out


def write_recall_report(path: Path, header: dict[str, Any], rows: dict[str, dict[str, float]]) -> None:
    """A retrieval benchmark's JSON (header fields and the rows) at `path`, and the rows printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, "rows": rows}, indent=1))
    for name, r in rows.items():
        print(f"{name:40s} r@1 {r['recall_at_1']:5.1f} r@5 {r['recall_at_5']:5.1f}")
    print(f"wrote {path}")


@torch.inference_mode()
def retrieval_recall(
    modules: CMTModules, docs: Sequence[dict[str, Any]], exs: Sequence[QAExample], bank: Bank
) -> dict[str, dict[str, float]]:
    """Recall@1/@5 of the gold document: the checkpoint's keys (by score, with the checkpoint's recency rule
    when it has one, and each part alone when they come from a key encoder plus a lexical part), Θ's
    backbone mean-pooled (untrained), BM25."""
    index = {d: i for i, d in enumerate(bank.ids)}
    gold = [index[e.doc_id] for e in exs]
    questions = [e.question for e in exs]
    q = modules.compressor.compress(questions).key.float().cpu()
    out = {"cmt_keys": _recall(q @ bank.keys.float().T, gold)}
    margin = modules.config.aggregator.recency_margin
    if margin > 0:
        picked = select_top_k_recent(q, bank.keys.float(), bank.timestamps, 5, margin).indices  # (Q, 5)
        out[f"cmt_keys_recency_margin_{margin:g}"] = _recall(picked, gold, ranked=True)
    if modules.reranker is not None:
        picked = modules.select(questions, q, bank, 5).indices  # (Q, 5)
        out[f"cmt_keys_reranked_top_{modules.config.aggregator.rerank_candidates}"] = _recall(picked, gold, ranked=True)
    out |= key_part_recall(modules.compressor, q, bank.keys.float(), gold)  # how much each part finds alone

    backbone, tok = modules.compressor.backbone, modules.compressor.tokenizer

    def pooled(texts: Sequence[str]) -> torch.Tensor:
        parts = []
        for i in range(0, len(texts), 64):
            enc = tok(
                list(texts[i : i + 64]), truncation=True, max_length=256, padding=True, return_tensors="pt"
            ).to(modules.device)
            h = backbone(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].to(h)
            parts.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1).float().cpu())
        return torch.cat(parts)

    out["theta_backbone_mean_pooled_untrained"] = _recall(pooled(questions) @ pooled([d["text"] for d in docs]).T, gold)
    out["bm25"] = _recall(bm25_top([d["text"] for d in docs], questions, 5), gold, ranked=True)
    return out
