"""The dense part of the retrieval key from a separate, frozen sentence encoder (CompressorConfig.key_encoder).

Letters: B texts, N windows of the key encoder, L tokens per window, d_s the encoder's width.

Θ's backbone is chosen for the memory (the frozen LLM's own first layers speak its language), which is
not what makes a good retrieval key: SmolLM2's first 4 layers, mean-pooled, find a SQuAD question's
paragraph at recall@1 28%, all-MiniLM-L6-v2 (trained on a billion sentence pairs for exactly this) at 72%.
The key's dense part therefore comes from such an encoder: its mean-pooled, L2-normalised embedding over
all windows of the text (sentence-transformers pooling; long texts are split into overlapping windows,
never cut). The encoder is frozen and loaded by name: nothing of it goes into a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from service.models.windows import WindowTokenizer


@dataclass
class KeyWindows:
    """Texts tokenized into the key encoder's windows; window i belongs to text text_index[i]."""

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    text_index: torch.Tensor  # (N,)
    num_texts: int

    def to(self, device: torch.device | str) -> KeyWindows:
        return KeyWindows(self.input_ids.to(device), self.attention_mask.to(device), self.text_index.to(device),
                          self.num_texts)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor, text_index: torch.Tensor, num_texts: int) -> torch.Tensor:
    """Mean of every real token of every window of a text (sentence-transformers pooling, across windows):
    hidden (N, L, d), mask (N, L), text_index (N,) → (B, d)."""
    m = mask.to(hidden.dtype)[..., None]  # (N, L, 1)
    sums = hidden.new_zeros(num_texts, hidden.shape[-1]).index_add(0, text_index, (hidden * m).sum(1))  # (B, d)
    counts = m.new_zeros(num_texts).index_add(0, text_index, m.sum((1, 2)))  # (B,)
    return sums / counts.clamp(min=1)[:, None]  # (B, d)


class KeyEncoder(nn.Module):
    def __init__(self, encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, window: int = 256,
                 overlap: int = 32) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.window, self.overlap = window, overlap
        self.windows = WindowTokenizer(tokenizer, window, overlap)

    @classmethod
    def load(cls, path: str) -> KeyEncoder:
        tokenizer = AutoTokenizer.from_pretrained(path)
        window = min(256, tokenizer.model_max_length)  # all-MiniLM was trained at 256
        return cls(AutoModel.from_pretrained(path), tokenizer, window)

    @property
    def width(self) -> int:
        """d_s: the width of the dense key part."""
        return self.encoder.config.hidden_size

    def train(self, mode: bool = True) -> KeyEncoder:
        """Frozen: always in eval mode (no dropout), whatever the module around it does."""
        super().train(mode)
        self.encoder.eval()
        return self

    def tokenize(self, texts: Sequence[str]) -> KeyWindows:
        return KeyWindows(*self.windows(texts), len(texts))

    def forward(self, windows: KeyWindows) -> torch.Tensor:
        """→ (B, d_s) the dense key part, L2-normalised (no gradient: the encoder is frozen)."""
        with torch.no_grad():
            hidden = self.encoder(input_ids=windows.input_ids,
                                  attention_mask=windows.attention_mask).last_hidden_state  # (N, L, d_s)
            pooled = mean_pool(hidden, windows.attention_mask, windows.text_index, windows.num_texts)  # (B, d_s)
            return F.normalize(pooled, dim=-1).float()  # (B, d_s)
