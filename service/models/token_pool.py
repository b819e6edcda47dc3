"""Θ's "token_embeddings" memory: k soft picks of the text's own input-token embeddings, in text order.

Letters: B docs, T token slots of a doc (all chunks packed, padding included), k memory tokens,
m picks kept per slot (CompressorConfig.stored_picks), d_e backbone width (= the frozen LLM's width
when the backbone is the LLM), V vocabulary.

Why: a memory made of new vectors must be taught to the frozen LLM from scratch, and short CPU runs
never got it read (the prefix collapsed to a constant prompt; models/smollm2-135m-instruct/README.md).
The LLM already reads its own token embeddings. Given the 32 rarest words of a SQuAD paragraph in text
order instead of the paragraph, SmolLM2-135M still reaches F1 18.9 (the paragraph: 29.5; nothing: 1.5),
so a memory that starts as such picks is read from step 0 and training refines what it picks.

Memory slot j is a softmax-weighted mix of the document's token embeddings: its logits over the text
are a salience per token (a learned per-vocabulary weight starting at the corpus IDF, plus a learned
function of the token's contextual state, starting at 0) divided by a temperature, plus a Gaussian
prior on the token's relative position centred on the j-th of k equal stretches of the text. So slot
j starts as "the rarest token near the j-th k-th of the text". A zero-initialised map of the same mix
of contextual states is added, so training can also write context (a word's other pieces, its role)
into the slot.

With m = stored_picks > 0 each slot keeps only its m heaviest picks, renormalised, and no map of
states: the memory is then exactly Σ_i w_i · E[id_i] over m (id, weight) pairs, which the bank stores
instead of the d_e-wide vectors (codec.TokenPicks) and the service turns back into the same memory.

With rule="distinct" or "spaced" (m = 1) the softmax only ranks: every token of the text is held at most
once, in text order; all of them when the text has at most k tokens, else the k most salient. Under
"stretch" a salient token wins every slot whose stretch it dominates and a dull one (often the
answer's "the", "of", a digit) none: on SQuAD valid 20% of the answers were not among 160 stored
slots, 10% with distinct picks (CompressorConfig.pick_rule). A text shorter than k is spread evenly over
the k slots: "distinct" repeats a token in the slots that follow it (weight 1), so a reader cannot tell
them from a token the text repeats ("2003" is "2", "0", "0", "3" to SmolLM2); "spaced" stores those
continuation slots with weight 0 (a zero vector the slot choice skips), so a run at weight 1 is the text's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ONE_TOKEN_RULES = ("distinct", "spaced")
"""Pick rules that hold each token of the text in at most one slot, one token a slot."""


class TokenPool(nn.Module):
    def __init__(
        self, vocab_size: int, width: int, num_slots: int, special_ids: Sequence[int] = (), num_picks: int = 0,
        rule: str = "stretch",
    ) -> None:
        super().__init__()
        self.num_slots = num_slots
        self.num_picks = num_picks
        self.rule = rule
        self.token_salience = nn.Parameter(torch.zeros(vocab_size))  # (V,) IDF after fit_idf
        self.state_salience = nn.Linear(width, 1)
        nn.init.zeros_(self.state_salience.weight)
        nn.init.zeros_(self.state_salience.bias)
        self.log_temperature = nn.Parameter(torch.zeros(()))  # τ = 1 at the start
        self.log_prior_width = nn.Parameter(torch.tensor(math.log(0.3)))  # σ in units of one stretch
        self.state_proj = None  # token picks store ids and weights only: no room for a map of states
        if not num_picks:
            self.state_proj = nn.Linear(width, width)
            nn.init.zeros_(self.state_proj.weight)
            nn.init.zeros_(self.state_proj.bias)
        usable = torch.ones(vocab_size, dtype=torch.bool)
        usable[[i for i in special_ids if 0 <= i < vocab_size]] = False  # BOS/EOS/padding say nothing
        self.register_buffer("usable", usable, persistent=False)  # (V,)

    @torch.no_grad()
    def fit_idf(self, token_ids: Sequence[Sequence[int]]) -> None:
        """Start the per-token salience at the corpus IDF (one token-id list per document)."""
        df = torch.zeros(len(self.token_salience), dtype=torch.float64)  # (V,)
        for ids in token_ids:
            df[torch.as_tensor(sorted(set(ids)), dtype=torch.int64)] += 1
        n = max(len(token_ids), 1)
        self.token_salience.copy_(torch.log1p((n - df + 0.5) / (df + 0.5)).float())

    def forward(
        self, ids: torch.Tensor, embeddings: torch.Tensor, states: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """ids (B, T), embeddings (B, T, d_e) input-token embeddings, states (B, T, d_e) contextual states,
        mask (B, T) bool (real tokens) → memory (B, k, d_e), and with num_picks the picks it is made of:
        token ids (B, k, m) and weights (B, k, m) (a text shorter than m tokens gets zero-weight fillers)."""
        if self.rule in ONE_TOKEN_RULES:
            where, filled = self.distinct_positions(ids, states, mask)  # (B, k) each
            top = filled[..., None].to(embeddings.dtype)  # (B, k, 1) 1, or 0 for a continuation slot
            picked = embeddings.gather(1, where[..., None].expand(-1, -1, embeddings.shape[-1]))  # (B, k, d_e)
            return picked * top, (ids.gather(1, where)[..., None], top)
        weights = self.pick_weights(ids, states, mask)  # (B, k, T)
        if not self.num_picks:
            return weights @ embeddings + self.state_proj(weights @ states), None  # (B, k, d_e)
        B, k, T = weights.shape
        top, where = weights.topk(min(self.num_picks, T), dim=-1)  # (B, k, m')
        top = top / top.sum(-1, keepdim=True)
        top = F.pad(top, (0, self.num_picks - top.shape[-1]))  # (B, k, m)
        where = F.pad(where, (0, self.num_picks - where.shape[-1]))  # (B, k, m)
        picked = embeddings.gather(1, where.view(B, -1, 1).expand(-1, -1, embeddings.shape[-1]))  # (B, k·m, d_e)
        memory = mix_picks(top, picked.view(B, k, self.num_picks, -1))  # (B, k, d_e)
        return memory, (ids.gather(1, where.view(B, -1)).view(B, k, -1), top)

    def distinct_positions(
        self, ids: torch.Tensor, states: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T), states (B, T, d_e), mask (B, T) → the text position each slot holds (B, k) and whether
        it is the first slot on it (B, k) under the ONE_TOKEN_RULES: the k most salient tokens (all when
        fewer), each once, in text order, spread evenly over the k slots when the text has fewer; "spaced"
        marks the slots that continue a token (False), "distinct" does not (all True)."""
        k, T = self.num_slots, ids.shape[1]
        real = self.readable(ids, mask)  # (B, T)
        salience = self.salience(ids, states).masked_fill(~real, -math.inf)  # (B, T)
        rank = salience.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # (B, T) 0 = the most salient
        kept = real & (rank < k)  # (B, T)
        pos = torch.arange(T, device=ids.device)  # (T,)
        in_order = torch.where(kept, pos, pos + T).argsort(dim=1)  # (B, T) kept positions first, in text order
        n = kept.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
        j = torch.arange(k, device=ids.device)  # (k,)
        slot = ((j + 0.5) * n / k).long()  # (B, k) which kept token
        filled = torch.ones_like(slot, dtype=torch.bool)  # (B, k)
        if self.rule == "spaced":
            filled[:, 1:] = slot[:, 1:] != slot[:, :-1]
        return in_order.gather(1, slot.clamp(max=T - 1)), filled  # (B, k) each

    def salience(self, ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """ids (B, T), states (B, T, d_e) → each token's salience (B, T): its token's learned IDF-like weight
        plus what its context adds."""
        return self.token_salience[ids] + self.state_salience(states).squeeze(-1)  # (B, T)

    def readable(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, T), mask (B, T) → (B, T) the tokens a slot may hold: real ones, not special."""
        real = mask & self.usable[ids]  # (B, T)
        return torch.where(real.any(1, keepdim=True), real, mask)  # a text of special tokens only keeps them

    def pick_weights(self, ids: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, T), states (B, T, d_e), mask (B, T) → each slot's weights over the text (B, k, T)."""
        k, dtype = self.num_slots, states.dtype
        real = self.readable(ids, mask)  # (B, T)
        order = real.cumsum(1) - 1  # (B, T) index of each real token in its text
        n = real.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
        where = (order.to(dtype) + 0.5) / n * k  # (B, T) position in units of one stretch
        centres = torch.arange(k, device=ids.device, dtype=dtype) + 0.5  # (k,)
        prior = -0.5 * ((where[:, None, :] - centres[None, :, None]) / self.log_prior_width.exp()) ** 2  # (B, k, T)
        salience = self.salience(ids, states)  # (B, T)
        logits = prior + (salience / self.log_temperature.exp())[:, None, :]  # (B, k, T)
        return logits.masked_fill(~real[:, None, :], float("-inf")).softmax(-1)  # (B, k, T)


def mix_picks(weights: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """weights (..., k, m), the picked tokens' embeddings (..., k, m, d_e) → memory (..., k, d_e): one
    formula for Θ's forward and for the service rebuilding a stored memory from its picks."""
    return (weights[..., None].to(embeddings.dtype) * embeddings).sum(-2)
