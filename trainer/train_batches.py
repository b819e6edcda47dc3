"""Batches of the trainer: distinct-document batches, the bank each batch's questions select from,
the frozen backbone's cache, autocast, and what the LLM is fed.

Letters: B questions in a batch, n prompt+answer tokens (padded), L backbone tokens, d backbone width.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import nullcontext
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from service.models.cmt import CMTModules
from trainer.data import QAExample, timestamp
from trainer.objectives import QABatch

if TYPE_CHECKING:
    from trainer.train import TrainConfig


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the trained modules stay fp32), nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class CachedBackbone(nn.Module):
    """Wraps a frozen encoder: each distinct token row is encoded once, later served from a cache.

    Rows are keyed by their unpadded token ids; a frozen encoder with an attention mask gives the
    same hidden states for a row whatever it is batched with, so this changes nothing but time.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}

    def get_input_embeddings(self) -> nn.Module:
        """The frozen encoder's token embeddings (Θ's token pool mixes them)."""
        return self.inner.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        valid = attention_mask.bool()  # (B, L)
        keys = [tuple(ids[m].tolist()) for ids, m in zip(input_ids, valid, strict=True)]
        missing = sorted({i for i, k in enumerate(keys) if k not in self.cache})
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)  # (M,)
            with torch.no_grad():
                hidden = self.inner(
                    input_ids=input_ids[rows], attention_mask=attention_mask[rows]
                ).last_hidden_state  # (M, L, d)
            for j, i in enumerate(missing):
                self.cache[keys[i]] = hidden[j][valid[i]].detach()  # (L_i, d)
        B, L = input_ids.shape
        first = self.cache[keys[0]]  # (L_0, d)
        out = first.new_zeros(B, L, first.shape[-1])  # (B, L, d)
        for i, k in enumerate(keys):
            out[i][valid[i]] = self.cache[k]
        return SimpleNamespace(last_hidden_state=out)


class use_cached_backbone:
    """Context manager: swap the compressor's frozen backbone for a CachedBackbone, restore after."""

    def __init__(self, modules: CMTModules, cache: CachedBackbone | None) -> None:
        self.modules, self.cache = modules, cache

    def __enter__(self) -> None:
        if self.cache is not None:
            self.original = self.modules.compressor.backbone
            self.modules.compressor.backbone = self.cache

    def __exit__(self, *exc: object) -> None:
        if self.cache is not None:
            self.modules.compressor.backbone = self.original


def make_batches(train: Sequence[QAExample], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of example indices whose gold documents are all distinct."""
    order = list(range(len(train)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    current: list[int] = []
    seen: set[str] = set()
    held: list[int] = []
    for i in order:
        if train[i].doc_id in seen:
            held.append(i)
            continue
        current.append(i)
        seen.add(train[i].doc_id)
        if len(current) == batch_size:
            batches.append(current)
            current, seen = [], set()
            if held:  # retry examples whose document was taken
                i2 = held.pop(0)
                current.append(i2)
                seen.add(train[i2].doc_id)
    if current:
        batches.append(current)
    return batches


def build_qa_batch(
    idx: Sequence[int], exs: Sequence[QAExample], docs: dict[str, dict[str, Any]], doc_ids: Sequence[str],
    config: TrainConfig, rng: random.Random,
) -> QABatch:
    """The examples' questions and gold documents, plus distractor documents for the bank: the other
    reports about the same entities (hard) and `config.distractors` sampled ones."""
    batch = [exs[i] for i in idx]
    in_batch = {e.doc_id for e in batch}
    extra: list[str] = []
    if config.hard_distractors:
        for e in batch:
            extra += [d for d in e.related if d not in in_batch and d not in extra]
    pool_size = config.distractors
    while pool_size > 0 and len(doc_ids) > len(in_batch) + len(extra):
        d = rng.choice(doc_ids)
        if d not in in_batch and d not in extra:
            extra.append(d)
            pool_size -= 1
    room = (config.aggregator.max_docs if not config.objective.use_top_k else 10**9) - len(batch)
    extra = extra[: max(0, room)]
    return QABatch(
        documents=[e.document for e in batch],
        questions=[e.question for e in batch],
        answers=[e.answers[0] for e in batch],
        timestamps=torch.tensor([e.timestamp for e in batch], dtype=torch.float64),  # (B,)
        distractors=[docs[d]["text"] for d in extra],
        distractor_timestamps=torch.tensor(
            [timestamp(docs[d].get("date")) for d in extra], dtype=torch.float64
        ),  # (len(extra),)
        window_starts=[rng.random() for _ in batch],  # drawn last: the distractors stay those of earlier runs
    )
