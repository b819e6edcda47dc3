"""π, the aligner: M* (k, d_m) → a key/value prefix of p positions for every layer of the LLM.

Letters: B batch, k memory tokens, p prefix positions, d_m memory width, r bottleneck width,
l LLM layers (l_n of them), H_kv key/value heads, hd head width, D = 2·H_kv·hd, d_llm the LLM's
embedding width.

A per-layer dense map from d_m to D would cost l_n·d_m·D parameters (≈100M for Llama-2-7B).
Instead one bottleneck MLP and one up-projection r → D are shared by all layers; each layer
adds its own embedding in the r-space and its own gain and bias in the output space. For a
Llama-2-7B-shaped LLM (l_n=32, H_kv=32, hd=128) with d_m=384, r=512 that is ≈5.2M parameters
(`Aligner.num_parameters_for`).

In "embeddings" mode the up-projection goes to p input embeddings (B, p, d_llm) instead, and the
frozen LLM itself turns them into its per-layer K/V (`prefix_from_embeddings`): one forward of p
positions per question, and every layer's prefix is what that layer expects by construction.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from service.errors import InvalidInputError
from service.models.config import AlignerConfig
from service.models.prefix import KVLayout, KVPrefix


class EmbeddingReader(Protocol):
    """The frozen LLM's side of "embeddings" mode: p input embeddings → its own per-layer K/V."""

    def prefix_from_embeddings(self, embeddings: torch.Tensor) -> KVPrefix: ...

    def text_embeddings(self, text: str) -> torch.Tensor: ...


class Aligner(nn.Module):
    def __init__(self, config: AlignerConfig, layout: KVLayout, memory_dim: int, num_memory_tokens: int) -> None:
        super().__init__()
        self.config, self.layout = config, layout
        p, k, r = config.prefix_len, num_memory_tokens, config.hidden_dim
        if config.mode == "embeddings" and not layout.hidden_size:
            raise InvalidInputError("an embeddings aligner needs the LLM's hidden size in its KVLayout")
        D = layout.hidden_size if config.mode == "embeddings" else 2 * layout.num_kv_heads * layout.head_dim
        l_n = 1 if config.mode == "embeddings" else layout.num_layers
        # Token mixing k → p; the identity when p == k so each prefix slot starts as one memory token.
        mix = torch.eye(p, k) if p == k else torch.randn(p, k) / k**0.5
        self.token_mix = nn.Parameter(mix)  # (p, k)
        self.in_norm = nn.LayerNorm(memory_dim)
        self.in_proj = nn.Linear(memory_dim, r)
        self.layer_embedding = nn.Parameter(torch.randn(l_n, r) * 0.02)  # (l_n, r)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(r, r), nn.GELU())
        self.up_proj = nn.Linear(r, D)
        self.layer_gain = nn.Parameter(torch.ones(l_n, D))  # (l_n, D)
        self.layer_bias = nn.Parameter(torch.zeros(l_n, D))  # (l_n, D)
        scale = config.output_rms or 0.02  # prompt tuning: n learned tokens at a real token's scale
        self.prompt_embedding = (
            nn.Parameter(torch.randn(config.prompt_tokens, D) * scale) if config.prompt_tokens else None
        )
        if config.residual:
            if memory_dim != D:
                raise InvalidInputError(
                    f"a residual aligner needs memory_dim equal to the LLM's width {D}, got {memory_dim}"
                )
            nn.init.zeros_(self.up_proj.weight)  # starts as M* itself
            nn.init.zeros_(self.up_proj.bias)

    @staticmethod
    def num_parameters_for(config: AlignerConfig, layout: KVLayout, memory_dim: int, num_memory_tokens: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in Aligner(config, layout, memory_dim, num_memory_tokens).parameters())

    def positions(self, llm: EmbeddingReader | None = None) -> int:
        """Prefix positions per layer the LLM attends to: p, plus the frame's tokens in "embeddings" mode."""
        frame = [t for t in (self.config.lead_text, self.config.tail_text) if t]
        if frame and llm is None:
            raise InvalidInputError("counting a framed prefix's positions needs the LLM's tokenizer")
        own = self.config.prefix_len + self.config.prompt_tokens
        return own + sum(len(llm.text_embeddings(t)) for t in frame) if frame else own

    def forward(self, m_star: torch.Tensor, llm: EmbeddingReader | None = None) -> KVPrefix:
        """m_star (B, k, d_m) → KVPrefix with keys[l], values[l] of (B, H_kv, p, hd). The LLM is needed
        (and only read) in "embeddings" mode."""
        if m_star.ndim != 3 or m_star.shape[1] != self.token_mix.shape[1] or not m_star.is_floating_point():
            raise InvalidInputError(
                f"M* must be a float (B, {self.token_mix.shape[1]}, d_m) tensor, "
                f"got {m_star.dtype} {tuple(m_star.shape)}"
            )
        B, p = m_star.shape[0], self.config.prefix_len
        x = torch.einsum("pk,bkd->bpd", self.token_mix, m_star)  # (B, p, d_m)
        h = self.in_proj(self.in_norm(x))  # (B, p, r)
        h = self.mlp(h[:, None] + self.layer_embedding[None, :, None])  # (B, l_n, p, r)
        out = self.up_proj(h)  # (B, l_n, p, D)
        if self.config.residual:
            out = out + x[:, None]  # (B, l_n, p, D)
        if self.config.mode == "embeddings" and self.config.output_rms > 0:  # the scale of a real token
            out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * self.config.output_rms
        out = out * self.layer_gain[:, None] + self.layer_bias[:, None]  # (B, l_n, p, D)
        if self.config.mode == "embeddings":
            if llm is None:
                raise InvalidInputError("an embeddings aligner needs the frozen LLM to turn its embeddings into K/V")
            emb = out[:, 0]  # (B, p, d_llm)
            lead, tail = self.config.lead_text, self.config.tail_text
            if lead or tail or self.prompt_embedding is not None:  # (B, n + lead + p + tail, d_llm)
                before, after = (llm.text_embeddings(t).to(emb).expand(B, -1, -1) for t in (lead, tail))
                prompt = (
                    emb[:, :0] if self.prompt_embedding is None else self.prompt_embedding.to(emb).expand(B, -1, -1)
                )
                emb = torch.cat([prompt, before, emb, after], dim=1)
            return llm.prefix_from_embeddings(emb)
        l_n, H_kv, hd = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        kv = out.view(B, l_n, p, 2, H_kv, hd).permute(1, 3, 0, 4, 2, 5)  # (l_n, 2, B, H_kv, p, hd)
        return KVPrefix(keys=list(kv[:, 0].unbind(0)), values=list(kv[:, 1].unbind(0)))
