"""The in-house base LLM: a small GPT-2 or Llama trained from scratch, then frozen for CMT.

No pretrained decoder can be downloaded here, so our experiments use an LLM we train ourselves on
the *training* split only: the reading-comprehension form

    Document: {document}\nQuestion: {question}\nAnswer: {answer}<eos>

plus the plain text of the training documents. It never sees a valid/test document, so its
no-memory answers on held-out entities are guesses, and the gold-in-prompt row shows what it can
do when the document is in front of it (the RAG upper bound). The result is written with
`save_pretrained` (model + tokenizer), so `HFCausalLM.from_pretrained(directory)` loads it.

Console: `python -m trainer.base_llm --data synthetic --out runs/llm`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from service.models.llm import HFCausalLM
from service.models.prompts import PROFILES
from trainer.data import examples, load_source
from trainer.tokenizer import train_bpe_tokenizer

PROFILE = PROFILES["plain"]
"""How the in-house base LLMs are taught to read: the "plain" prompt profile."""


@dataclass
class BaseLLMConfig:
    arch: str = "gpt2"
    """"gpt2" or "llama"."""
    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 384
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 30
    plain_text_share: float = 0.25
    """Share of training sequences that are plain document text instead of the RC form."""
    seed: int = 0
    device: str = "cpu"
    max_seconds: float | None = None
    """Stop early after this much wall time (the schedule still assumes `steps`)."""


def build_model(config: BaseLLMConfig, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    common = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    if config.arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=len(tokenizer), n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
            n_positions=config.max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
        return GPT2LMHeadModel(cfg)
    if config.arch == "llama":
        cfg = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=max(1, config.num_heads // 2),
            intermediate_size=config.hidden_size * 3, max_position_embeddings=config.max_positions,
            tie_word_embeddings=True, **common,
        )
        return LlamaForCausalLM(cfg)
    raise ValueError(f"unknown arch {config.arch!r}: use gpt2 or llama")


def training_texts(docs: Sequence[dict[str, Any]]) -> tuple[list[tuple[str, str]], list[str]]:
    """RC pairs (prompt, " answer") and plain documents of a training split."""
    rc = [(PROFILE.context_prompt(e.question, [e.document]), " " + e.answers[0].strip()) for e in examples(docs)]
    return rc, [d["text"] for d in docs]


def _encode(tokenizer, prompt: str, answer: str | None) -> tuple[list[int], list[int]]:
    ids = tokenizer(prompt)["input_ids"]
    if answer is None:  # plain text: every token is a target
        ids = ids + [tokenizer.eos_token_id]
        return ids, ids
    target = tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
    return ids + target, [-100] * len(ids) + target


def _batch(rows: list[tuple[list[int], list[int]]], pad_id: int, max_len: int):
    rows = [(ids[-max_len:], lab[-max_len:]) for ids, lab in rows]
    n = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (r, lab) in enumerate(rows):  # right padding for training; positions start at 0
        ids[i, : len(r)], labels[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(lab), 1
    return ids, mask, labels


def train_base_llm(
    docs: Sequence[dict[str, Any]], out_dir: str | Path, config: BaseLLMConfig | None = None
) -> dict[str, Any]:
    """Train tokenizer + LLM on the training documents; save to out_dir; returns the metrics."""
    config = config or BaseLLMConfig()
    out_dir = Path(out_dir)
    rng = random.Random(config.seed)
    rc, plain = training_texts(docs)
    if not rc:
        raise ValueError("the training documents carry no questions: nothing to learn the RC form from")
    start = time.perf_counter()
    corpus = [p + a for p, a in rc] + plain
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=config.vocab_size)
    rc_enc = [_encode(tokenizer, p, a) for p, a in rc]
    plain_enc = [_encode(tokenizer, t, None) for t in plain]
    model = build_model(config, tokenizer).to(config.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / config.warmup) * 0.5
        * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)),
    )
    n_plain = round(config.batch_size * config.plain_text_share)
    log, losses = [], []
    bar = tqdm(range(config.steps), desc="base LLM", leave=False, mininterval=2)
    for step in bar:
        rows = (rng.sample(rc_enc, min(len(rc_enc), config.batch_size - n_plain))
                + rng.sample(plain_enc, min(len(plain_enc), n_plain)))
        ids, mask, labels = (t.to(config.device) for t in _batch(rows, tokenizer.pad_token_id, config.max_positions))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == config.steps - 1:
            mean = sum(losses[-20:]) / len(losses[-20:])
            bar.set_postfix(loss=f"{mean:.3f}")
            log.append({"step": step, "loss": mean})
        if config.max_seconds and time.perf_counter() - start > config.max_seconds:
            break
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    metrics = {
        "config": asdict(config), "steps_done": step + 1, "seconds": time.perf_counter() - start,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]), "parameters": sum(p.numel() for p in model.parameters()),
        "train_rc_examples": len(rc), "train_documents": len(plain), "log": log,
    }
    (out_dir / "base_llm_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def load_base_llm(directory: str | Path, device: str = "cpu") -> HFCausalLM:
    return HFCausalLM.from_pretrained(str(directory), device=device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the in-house base LLM (frozen LLM of our experiments).")
    parser.add_argument("--data", default="synthetic",
                        help='"synthetic[:entities]", "squad", "archivalqa" or a JSONL pattern with {split}')
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    for name, field_ in BaseLLMConfig.__dataclass_fields__.items():
        if name in ("seed",):
            continue
        kind = type(field_.default) if field_.default is not None else float
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=field_.default)
    args = parser.parse_args(argv)
    config = BaseLLMConfig(**{k: getattr(args, k) for k in BaseLLMConfig.__dataclass_fields__})
    docs = load_source(args.data, "train", seed=args.seed)
    metrics = train_base_llm(docs, args.out, config)
    print(json.dumps({k: v for k, v in metrics.items() if k != "log"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
