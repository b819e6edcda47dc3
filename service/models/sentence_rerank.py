"""Re-scoring the index's best documents: by their word pieces, then by their best-matching sentence
(AggregatorConfig.rerank_*).

Letters: B questions, C candidates per question, C2 ≤ C of them in the sentence stage, S sentences of a
document, d_s the key encoder's width.

Why: the retrieval key pools a whole paragraph into one vector, while a question asks about one of its
sentences, and the paragraphs of one article share its names and topics: pooled, they blur. On the SQuAD
test stream (1,665 paragraphs of 48 articles) the key finds a question's paragraph first for 76.8% of the
8,611 questions and among its best 4 for 93.2%. Re-scoring the best 4 by key
score + 0.3 · (the question's best cosine with one sentence of the document, from the same frozen key encoder)
put it first for 79.9%. Re-scoring the best 16 first by their BM25 over word pieces (`lexical_rerank`, weight
0.12), then the best 4 of those by their sentences (weight 0.6), puts it first for 81.8% (SQuAD-train valid,
where these were chosen: 83.3 → 85.1; bench/bench_key_recall.py), for the same sentence encodings.

The index keeps one key per document: sentences are encoded and word pieces counted only for a question's
candidates, from the stored text, and kept in LRU caches by content, so a document asked about again costs
nothing."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from service.models.config import AggregatorConfig
from service.models.content_cache import ContentCache
from service.models.key_encoder import KeyEncoder
from service.models.lexical_rerank import CandidateTerms

if TYPE_CHECKING:
    from service.models.compressor import Compressor

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
"""A sentence ends at . ! or ? followed by space and a capital or a digit (optionally after a quote or
bracket): abbreviations inside a sentence ("e.g. the") stay joined."""


def split_sentences(text: str) -> list[str]:
    """A text's sentences (the whole text when it has one); never empty for a non-blank text."""
    return [s for s in (part.strip() for part in SENTENCE_END.split(text)) if s] or [text]


def question_dense(keys: torch.Tensor, width: int) -> torch.Tensor:
    """The key encoder's direction of retrieval keys [dense (d_s) ; β·lexical]: (B, d_k) → (B, d_s), L2-normalised."""
    return F.normalize(keys[:, :width].float(), dim=-1)  # (B, d_s)


class SentenceKeys:
    """Per document, its sentences' key-encoder embeddings (S, d_s), L2-normalised, fp16 on the CPU; computed
    for the documents not in the LRU cache (keyed by the text's digest, so an edited text is re-encoded)."""

    def __init__(self, encoder: KeyEncoder, cache_docs: int = 20_000, batch_size: int = 32) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self._cache: ContentCache[torch.Tensor] = ContentCache(cache_docs)

    @property
    def width(self) -> int:
        return self.encoder.width

    def __call__(self, texts: Sequence[str]) -> list[torch.Tensor]:
        return self._cache.get(texts, self._encode)

    def _encode(self, texts: list[str]) -> list[torch.Tensor]:
        parts = [split_sentences(t) for t in texts]
        flat = [s for sentences in parts for s in sentences]
        # batches of similar lengths: padding to a batch's longest sentence doubled the cost on SQuAD paragraphs
        order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
        device = next(self.encoder.parameters()).device
        embedded = torch.empty(len(flat), self.width, dtype=torch.float16)  # (ΣS, d_s)
        for i in range(0, len(flat), self.batch_size):
            rows = order[i : i + self.batch_size]
            windows = self.encoder.tokenize([flat[j] for j in rows]).to(device)
            embedded[rows] = self.encoder(windows).to("cpu", torch.float16)  # (b, d_s)
        return list(embedded.split([len(sentences) for sentences in parts]))  # each (S, d_s)


class Reranker:
    """What re-scores the index's best documents (AggregatorConfig.rerank_*): the best C by key score get
    + rerank_lexical_weight · their BM25 over word pieces divided by the best's (`lexical_rerank`), then the
    best rerank_sentence_candidates of those + rerank_sentence_weight · the question's best sentence cosine.
    The sentence term is at least 0, so a candidate left out of the second stage never overtakes one in it."""

    def __init__(self, config: AggregatorConfig, sentence_keys: SentenceKeys, terms: CandidateTerms | None) -> None:
        self.config = config
        self.sentence_keys = sentence_keys
        self.terms = terms

    @classmethod
    def build(cls, config: AggregatorConfig, compressor: Compressor, cache_docs: int = 20_000) -> Reranker:
        """From Θ's key encoder and, with rerank_lexical_weight > 0, its lexical key's token weights."""
        terms = None
        if config.rerank_lexical_weight > 0:
            terms = CandidateTerms(compressor.key_encoder.tokenizer, compressor.lexical_key,
                                   config.rerank_lexical_mean_tokens, cache_docs)
        return cls(config, SentenceKeys(compressor.key_encoder, cache_docs), terms)

    def __call__(self, questions: Sequence[str], keys: torch.Tensor, pool_scores: torch.Tensor,
                 pool_texts: Sequence[Sequence[str | None]]) -> torch.Tensor:
        """The candidates' new scores (B, C), on the CPU (where the caches are): questions and their retrieval
        keys (B, d_k), pool_scores (B, C) their key scores (-inf where padded), pool_texts[b][c] the candidate's
        text (None where padded)."""
        scores = pool_scores.float().cpu()  # (B, C)
        if self.terms is not None:
            scores = scores + self.config.rerank_lexical_weight * self.terms.scores(questions, pool_texts)  # (B, C)
        C2 = min(self.config.rerank_sentence_candidates or scores.shape[1], scores.shape[1])
        staged = scores.topk(C2, dim=1).indices.tolist()  # (B, C2) the sentence stage's candidates
        texts = [[pool_texts[b][c] for c in row] for b, row in enumerate(staged)]
        distinct = list(dict.fromkeys(t for row in texts for t in row if t is not None))
        encoded = dict(zip(distinct, self.sentence_keys(distinct), strict=True))
        questions_dense = question_dense(keys, self.sentence_keys.width).cpu()  # (B, d_s)
        for b, row in enumerate(staged):
            for c, text in zip(row, texts[b], strict=True):
                if text is not None:
                    best = (encoded[text].float() @ questions_dense[b]).max().clamp(min=0)  # (S,) → ()
                    scores[b, c] += self.config.rerank_sentence_weight * best
        return scores  # (B, C)
