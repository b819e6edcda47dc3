"""Re-scoring the index's best documents by their best-matching sentence (AggregatorConfig.rerank_candidates).

Letters: B questions, C candidates per question, S sentences of a document, d_s the key encoder's width.

Why: the retrieval key pools a whole paragraph into one vector, while a question asks about one of its
sentences, and the paragraphs of one article share its names and topics: pooled, they blur. On the SQuAD
test stream (1,665 paragraphs of 48 articles) the key finds a question's paragraph first for 76.8% of the
8,611 questions and among its best 4 for 93.2%. Re-scoring those 4 by key score + w · (the question's best
cosine with one sentence of the document, from the same frozen key encoder) puts it first for 79.9%
(SQuAD-train valid, where C = 4 and w = 0.3 were chosen: 81.5 → 84.2; bench/bench_key_recall.py).

The index keeps one key per document: sentences are encoded only for a question's candidates, from the
stored text, and kept in an LRU cache by content, so a document asked about again costs nothing.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from cachetools import LRUCache

from service.models.key_encoder import KeyEncoder

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
        self._cache: LRUCache[str, torch.Tensor] = LRUCache(maxsize=max(1, cache_docs))
        self._lock = threading.Lock()  # the cache is shared by the ask batcher's and the warm-up's threads

    @property
    def width(self) -> int:
        return self.encoder.width

    def __call__(self, texts: Sequence[str]) -> list[torch.Tensor]:
        digests = [hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in texts]
        found: dict[str, torch.Tensor] = {}
        with self._lock:
            for d in digests:
                if d in self._cache:
                    found[d] = self._cache[d]
        missing = {d: t for d, t in zip(digests, texts, strict=True) if d not in found}
        if missing:
            found |= self._encode(missing)
            with self._lock:
                for d in missing:
                    self._cache[d] = found[d]
        return [found[d] for d in digests]

    def _encode(self, texts: dict[str, str]) -> dict[str, torch.Tensor]:
        parts = {d: split_sentences(t) for d, t in texts.items()}
        flat = [s for sentences in parts.values() for s in sentences]
        # batches of similar lengths: padding to a batch's longest sentence doubled the cost on SQuAD paragraphs
        order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
        device = next(self.encoder.parameters()).device
        embedded = torch.empty(len(flat), self.width, dtype=torch.float16)  # (ΣS, d_s)
        for i in range(0, len(flat), self.batch_size):
            rows = order[i : i + self.batch_size]
            windows = self.encoder.tokenize([flat[j] for j in rows]).to(device)
            embedded[rows] = self.encoder(windows).to("cpu", torch.float16)  # (b, d_s)
        out, start = {}, 0
        for d, sentences in parts.items():
            out[d] = embedded[start : start + len(sentences)]  # (S, d_s)
            start += len(sentences)
        return out


def rerank_scores(
    key_scores: torch.Tensor, questions: torch.Tensor, sentences: Sequence[Sequence[torch.Tensor | None]],
    weight: float,
) -> torch.Tensor:
    """key_scores (B, C) (-inf where padded) + weight · the best sentence cosine of each candidate.

    questions (B, d_s) from `question_dense`; sentences[b][c] (S, d_s) from SentenceKeys (None where padded).
    """
    best = torch.zeros_like(key_scores, dtype=torch.float32)  # (B, C)
    for b, row in enumerate(sentences):
        for c, keys in enumerate(row):
            if keys is not None:
                best[b, c] = (keys.float() @ questions[b].float()).max()  # (S,) → ()
    return key_scores.float() + weight * best  # (B, C)


def rerank_pool(
    sentence_keys: SentenceKeys, keys: torch.Tensor, pool_scores: torch.Tensor,
    pool_texts: Sequence[Sequence[str | None]], weight: float,
) -> torch.Tensor:
    """The candidates' new scores (B, C), on the CPU (where the sentence keys are cached): keys (B, d_k) the
    questions' retrieval keys, pool_scores (B, C) their key scores (-inf where padded), pool_texts[b][c] the
    candidate's text (None where padded)."""
    distinct = list(dict.fromkeys(t for row in pool_texts for t in row if t is not None))
    encoded = dict(zip(distinct, sentence_keys(distinct), strict=True))
    sentences = [[None if t is None else encoded[t] for t in row] for row in pool_texts]
    questions = question_dense(keys, sentence_keys.width).cpu()  # (B, d_s)
    return rerank_scores(pool_scores.cpu(), questions, sentences, weight)  # (B, C)
