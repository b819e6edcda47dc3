"""Pre-norm cross-attention block shared by Θ (soft tokens over text) and ψ (question over memories).

    B batch, Q query tokens, C context tokens, d width, h heads
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttentionBlock(nn.Module):
    """x ← x + Attn(LN(x), LN(ctx)); x ← x + FFN(LN(x)).

    Queries whose context is entirely masked (an empty bank, say) attend to nothing and keep
    their input unchanged instead of producing NaN.
    """

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0, ffn_mult: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm_q = nn.LayerNorm(width)
        self.norm_ctx = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width)
        )

    def zero_outputs(self) -> None:
        """Make the block the identity (both residual branches add 0) until training moves it."""
        for layer in (self.out_proj, self.ffn[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        """x (B, Q, d), ctx (B, C, d), ctx_mask (B, C) bool (True = attend) → (B, Q, d)."""
        B, Q, d = x.shape
        C = ctx.shape[1]
        h = self.num_heads
        q = self.q_proj(self.norm_q(x)).view(B, Q, h, d // h).transpose(1, 2)  # (B, h, Q, d/h)
        kv = self.kv_proj(self.norm_ctx(ctx)).view(B, C, 2, h, d // h)  # (B, C, 2, h, d/h)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, C, d/h)
        has_ctx = ctx_mask.any(dim=1)  # (B,)
        # A fully masked row would give NaN in softmax: let it see everything, then zero it below.
        safe_mask = ctx_mask | ~has_ctx[:, None]  # (B, C)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=safe_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, Q, d/h)
        attn = self.out_proj(attn.transpose(1, 2).reshape(B, Q, d))  # (B, Q, d)
        x = x + attn * has_ctx[:, None, None].to(attn.dtype)
        return x + self.ffn(self.norm_ffn(x))
