"""The lexical part of the retrieval key: a text's distinct tokens, weighted, hashed into d_m buckets.

Letters: B texts, N chunks, L tokens per chunk, V tokenizer vocabulary, d_m key width.

Dense sentence embeddings blur rare names: "Preirdusk Labs" and "Douskveis Labs" pool to nearly the
same vector, so a question about one retrieves the other once the bank holds both. This part makes
an exact token match count, as BM25 does: each distinct token t of a text adds w[t]·s(t) to bucket
h(t) of a d_m vector, with a fixed sign s(t) = ±1 so that unrelated tokens sharing a bucket cancel on
average (feature hashing). The dot product of two such vectors is then about the weighted overlap of
their token sets. w starts as the training corpus' BM25 IDF (rare tokens count most) and is learned
with the rest of the key. The key stays one d_m vector: the index and the stored layout are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_BUCKET_MULT, _SIGN_MULT = 2654435761, 2246822519  # Knuth / xxHash primes: fixed, so stored keys stay valid


class LexicalKey(nn.Module):
    def __init__(self, vocab_size: int, dim: int, special_ids: Iterable[int] = ()) -> None:
        super().__init__()
        ids = torch.arange(vocab_size, dtype=torch.int64)  # (V,)
        self.weight = nn.Parameter(torch.ones(vocab_size))  # (V,) learned token weights (IDF at the start)
        self.register_buffer("bucket", (ids * _BUCKET_MULT % 2**32) % dim, persistent=False)  # (V,)
        sign = 1.0 - 2.0 * ((ids * _SIGN_MULT % 2**32) >> 16 & 1).float()  # (V,)
        self.register_buffer("sign", sign, persistent=False)  # (V,)
        usable = torch.ones(vocab_size, dtype=torch.bool)
        usable[[i for i in special_ids if 0 <= i < vocab_size]] = False  # [CLS], [SEP], [PAD] say nothing
        self.register_buffer("usable", usable, persistent=False)  # (V,)
        self.dim = dim

    @torch.no_grad()
    def fit_idf(self, token_ids: Sequence[Sequence[int]]) -> None:
        """Set the weights to BM25's IDF over a corpus (one token-id list per document)."""
        df = torch.zeros(len(self.weight), dtype=torch.float64)  # (V,)
        for ids in token_ids:
            df[torch.as_tensor(sorted(set(ids)), dtype=torch.int64)] += 1
        n = len(token_ids)
        idf = torch.log1p((n - df + 0.5) / (df + 0.5)) if n else torch.full_like(df, math.log(2.0))  # (V,)
        self.weight.copy_(idf.float())

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, doc_index: torch.Tensor, num_docs: int
    ) -> torch.Tensor:
        """input_ids, attention_mask (N, L) of the chunks, doc_index (N,) → (B, d_m), L2-normalised."""
        V = len(self.weight)
        rows = doc_index[:, None].expand_as(input_ids)  # (N, L)
        real = attention_mask.bool() & self.usable[input_ids]  # (N, L)
        pairs = torch.unique(rows[real] * V + input_ids[real])  # (P,) each distinct (text, token) once
        text, token = pairs // V, pairs % V  # (P,), (P,)
        values = self.weight[token] * self.sign[token]  # (P,)
        where = (text, self.bucket[token])  # (P,), (P,)
        lexical = values.new_zeros(num_docs, self.dim).index_put(where, values, accumulate=True)  # (B, d_m)
        return F.normalize(lexical, dim=-1)
