"""ψ, the aggregator: a question's k tokens read the memories of the top-k relevant documents.

Letters: B questions, N docs in a bank, K selected docs, k memory tokens, d_m memory width.

Selection is by cosine of retrieval keys. The selected memories are concatenated
[M^1; …; M^K] (K·k tokens) with two position signals: a slot embedding (where inside its memory
a vector sits) and a recency embedding (rank of the document, 0 = newest), so that "rain on
1 Feb, snow on 2 Feb" and the reverse give different M*, and a later report can win.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from service.errors import InvalidInputError
from service.models.attention import CrossAttentionBlock
from service.models.config import AggregatorConfig


@dataclass
class Selection:
    """Top-k documents per question; rows with fewer than top_k candidates are padded."""

    indices: torch.Tensor  # (B, K) bank row of each selected doc, -1 where padded
    scores: torch.Tensor  # (B, K) cosine of question key and doc key, -inf where padded

    @property
    def mask(self) -> torch.Tensor:
        return self.indices >= 0  # (B, K)


def select_top_k(query_keys: torch.Tensor, bank_keys: torch.Tensor, top_k: int) -> Selection:
    """Exact top-k by inner product of L2-normalised keys. K = min(top_k, N); an empty bank gives K=0."""
    if query_keys.ndim != 2 or bank_keys.ndim != 2 or query_keys.shape[1] != bank_keys.shape[1]:
        raise InvalidInputError(
            f"keys must be (B, d) and (N, d) with the same d, got {tuple(query_keys.shape)} "
            f"and {tuple(bank_keys.shape)}"
        )
    if not (query_keys.is_floating_point() and bank_keys.is_floating_point()):
        raise InvalidInputError(f"keys must be floating point, got {query_keys.dtype} and {bank_keys.dtype}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidInputError(f"top_k must be an integer >= 1, got {top_k!r}")
    B, N = query_keys.shape[0], bank_keys.shape[0]
    K = min(top_k, N)
    if K == 0:
        empty = torch.empty(B, 0, device=query_keys.device)
        return Selection(indices=empty.long(), scores=empty)
    scores = query_keys @ bank_keys.to(query_keys.dtype).T  # (B, N)
    top = scores.topk(K, dim=1)  # (B, K)
    return Selection(indices=top.indices, scores=top.values)


def recency_candidates(top_k: int) -> int:
    """How many best-scored documents the recency rule chooses its top_k from."""
    return max(4 * top_k, 8)


def select_recent(scores: Sequence[float], times: Sequence[float], top_k: int, margin: float) -> list[int]:
    """Positions of up to top_k candidates: each pick is the newest of those scoring within `margin`
    of the best candidate left (ties in time: the better score). margin 0 = plain order by score."""
    left = list(range(len(scores)))
    picked = []
    while left and len(picked) < top_k:
        best = max(scores[i] for i in left)
        pick = max((i for i in left if scores[i] >= best - margin), key=lambda i: (times[i], scores[i]))
        picked.append(pick)
        left.remove(pick)
    return picked


def select_top_k_recent(
    query_keys: torch.Tensor, bank_keys: torch.Tensor, timestamps: torch.Tensor, top_k: int, margin: float
) -> Selection:
    """select_top_k with the recency rule of select_recent over the best recency_candidates(top_k)."""
    if margin <= 0:
        return select_top_k(query_keys, bank_keys, top_k)
    pool = select_top_k(query_keys, bank_keys, recency_candidates(top_k))  # (B, C)
    K = min(top_k, pool.indices.shape[1])
    if K == 0:
        return pool
    times = timestamps.double().cpu()[pool.indices.clamp(min=0).cpu()].tolist()  # (B, C)
    rows = [select_recent(s, t, K, margin) for s, t in zip(pool.scores.float().cpu().tolist(), times, strict=True)]
    order = torch.tensor(rows, dtype=torch.long, device=pool.indices.device).view(-1, K)  # (B, K)
    return Selection(pool.indices.gather(1, order), pool.scores.gather(1, order))


def newest_first(times: Sequence[float], scores: Sequence[float]) -> list[int]:
    """Positions ordered newest first; the same time: the better score first, then the earlier position.
    The one recency order of training and serving, so ψ sees the same recency ranks in both."""
    return sorted(range(len(times)), key=lambda i: (-times[i], -scores[i], i))


def order_newest_first(selection: Selection, timestamps: torch.Tensor) -> Selection:
    """Reorder each row's selected docs by `newest_first` (padding stays at the end).

    timestamps: (N,) float seconds (published_at, else received_at) of every bank row.
    """
    if selection.indices.shape[1] == 0:
        return selection
    ts = timestamps.double().cpu()[selection.indices.clamp(min=0).cpu()]  # (B, K)
    ts = torch.where(selection.mask.cpu(), ts, torch.full_like(ts, float("-inf")))  # (B, K)
    scores = selection.scores.double().cpu().masked_fill(~selection.mask.cpu(), float("-inf"))  # (B, K)
    rows = [newest_first(t, s) for t, s in zip(ts.tolist(), scores.tolist(), strict=True)]
    order = torch.tensor(rows, dtype=torch.long, device=selection.indices.device)  # (B, K)
    return Selection(selection.indices.gather(1, order), selection.scores.gather(1, order))


class Aggregator(nn.Module):
    def __init__(self, config: AggregatorConfig, memory_dim: int, num_memory_tokens: int) -> None:
        super().__init__()
        self.config = config
        self.num_memory_tokens = num_memory_tokens
        self.slot_embedding = nn.Parameter(torch.randn(num_memory_tokens, memory_dim) * 0.02)
        self.recency_embedding = nn.Parameter(torch.randn(config.max_docs, memory_dim) * 0.02)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(memory_dim, config.num_heads, config.dropout)
            for _ in range(config.num_layers)
        )
        if config.identity_init:
            nn.init.zeros_(self.slot_embedding)
            for block in self.blocks:
                block.zero_outputs()
        self.out_norm = nn.LayerNorm(memory_dim)

    def forward(
        self, question: torch.Tensor, memories: torch.Tensor, doc_mask: torch.Tensor
    ) -> torch.Tensor:
        """question (B, k, d_m); memories (B, K, k, d_m) newest first; doc_mask (B, K) → M* (B, k, d_m).

        Rows whose doc_mask is all False (empty bank) pass the question (or zeros) through; the caller
        then gives the LLM no prefix for them.
        """
        B, K, k, d_m = memories.shape
        asks = self.config.queries == "question"  # else the question is not read (its width may differ)
        if (asks and question.shape != (B, k, d_m)) or doc_mask.shape != (B, K):
            raise InvalidInputError(
                f"shape mismatch: question {tuple(question.shape)}, memories {tuple(memories.shape)}, "
                f"doc_mask {tuple(doc_mask.shape)}"
            )
        if not (question.is_floating_point() and memories.is_floating_point()):
            raise InvalidInputError(
                f"question and memories must be floating point, got {question.dtype}, {memories.dtype}"
            )
        if K > self.config.max_docs:
            raise InvalidInputError(f"{K} documents exceed the aggregator's max_docs={self.config.max_docs}")
        if k != self.num_memory_tokens:
            raise InvalidInputError(f"memories have {k} tokens, the aggregator expects {self.num_memory_tokens}")
        ctx = memories + self.slot_embedding + self.recency_embedding[:K, None]  # (B, K, k, d_m)
        ctx = ctx.reshape(B, K * k, d_m)  # (B, K·k, d_m)
        ctx_mask = doc_mask.bool().repeat_interleave(k, dim=1)  # (B, K·k)
        if self.config.queries == "memories":  # M* from the documents alone (AggregatorConfig.queries)
            weights = doc_mask.to(memories)[..., None, None]  # (B, K, 1, 1)
            x = (memories * weights).sum(1) / weights.sum(1).clamp(min=1) + self.slot_embedding  # (B, k, d_m)
        else:
            x = question + self.slot_embedding  # (B, k, d_m)
        for block in self.blocks:
            x = block(x, ctx, ctx_mask)
        return self.out_norm(x)  # (B, k, d_m)
