"""Re-scoring the index's best documents by BM25 over their word pieces (AggregatorConfig.rerank_lexical_weight).

Letters: B questions, C candidates per question, V the key tokenizer's vocabulary.

Why: the retrieval key's lexical part hashes a text's distinct tokens into d_k − d_s buckets, so it counts
neither how often a word occurs nor how long the text is, and unrelated tokens share buckets. Among the
index's best C that approximation can be replaced by the real thing: BM25 (k1 1.5, b 0.75) over the key
tokenizer's word pieces, each term weighted by the lexical key's learned token weight (it started as the
training corpus' BM25 IDF), so no statistics of the bank are needed. A candidate's score is divided by the
best candidate's, so the weight means the same for every question. On SQuAD-train valid (its first 1,000
questions, where C = 16 and the weights were chosen) this before the sentence stage puts the gold paragraph first
for 85.1% instead of 83.3% (sentences alone on the best 4), on the SQuAD test stream (8,611) for 81.8% instead of
79.9% (bench/bench_key_recall.py). BM25 over the whole bank would need a term index of the bank kept beside the
key index; over the candidates, with the checkpoint's weights as IDF, it needs nothing of the bank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from service.models.content_cache import ContentCache
from service.models.lexical_key import LexicalKey

K1, B_LENGTH = 1.5, 0.75
"""BM25's term-frequency saturation and length normalisation (Lucene's defaults, as bm25s uses)."""


class CandidateTerms:
    """BM25 of questions against candidate texts over a tokenizer's word pieces, with given token weights as
    IDF. Each text's distinct token ids and counts are kept in an LRU cache keyed by the text's content."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, lexical_key: LexicalKey, mean_tokens: float,
                 cache_docs: int = 20_000) -> None:
        """lexical_key: its token weights are the terms' IDF (read at each call: a checkpoint loaded after this
        was built is used), its special ids count for nothing; mean_tokens: BM25's average text length, in
        word pieces (its training corpus')."""
        self.tokenizer = tokenizer
        self.lexical_key = lexical_key
        self.mean_tokens = mean_tokens
        self._cache: ContentCache[tuple[torch.Tensor, torch.Tensor, int]] = ContentCache(cache_docs)

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def term_counts(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Per text: its distinct ids (T,), their counts (T,) and its length in word pieces."""
        return self._cache.get(texts, self._count)

    def _count(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        out = []
        for ids in self._ids(texts):
            distinct, counts = torch.as_tensor(ids, dtype=torch.long).unique(return_counts=True)  # (T,), (T,)
            out.append((distinct, counts.float(), len(ids)))
        return out

    def scores(self, questions: Sequence[str], pool_texts: Sequence[Sequence[str | None]]) -> torch.Tensor:
        """(B, C) each candidate's BM25 divided by the row's best (0 where padded or nothing matches)."""
        distinct = list(dict.fromkeys(t for row in pool_texts for t in row if t is not None))
        terms = dict(zip(distinct, self.term_counts(distinct), strict=True))
        C = max((len(row) for row in pool_texts), default=0)
        weights = (self.lexical_key.weight.detach().float() * self.lexical_key.usable).cpu()  # (V,) 0 if special
        out = torch.zeros(len(questions), C)  # (B, C)
        for b, (question, row) in enumerate(zip(self._ids(questions), pool_texts, strict=True)):
            asked = torch.as_tensor(sorted(set(question)), dtype=torch.long)  # (Tq,)
            for c, text in enumerate(row):
                if text is None:
                    continue
                ids, counts, length = terms[text]  # (T,), (T,), ()
                hit = torch.isin(ids, asked)  # (T,)
                tf = counts[hit]  # (h,)
                norm = K1 * (1 - B_LENGTH + B_LENGTH * length / self.mean_tokens)
                out[b, c] = (weights[ids[hit]] * tf * (K1 + 1) / (tf + norm)).sum()
        best = out.max(dim=1, keepdim=True).values  # (B, 1)
        return torch.where(best > 0, out / best.clamp(min=1e-9), torch.zeros_like(out))  # (B, C)
