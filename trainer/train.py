"""Offline trainer of Θ/ψ/π against a frozen LLM (DESIGN.md §1).

    python -m trainer.train --llm runs/llm --data synthetic --out runs/cmt

Every objective term is switchable (--alpha 0, --self-match-weight 0, --no-top-k) for ablations.
Writes <out>/best (checkpoint with the best validation EM), <out>/last (+ trainer_state.pt, for
--resume) every --ckpt-every optimizer steps, and <out>/train_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from service.models.checkpoint import load_checkpoint, save_checkpoint
from service.models.cmt import CMTModules
from service.models.config import (
    AggregatorConfig,
    AlignerConfig,
    CMTConfig,
    CompressorConfig,
)
from service.models.llm import HFCausalLM
from trainer.data import QAExample, examples, load_source, timestamp
from trainer.objectives import ObjectiveConfig, QABatch, qa_objective

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    llm: str = ""
    """Frozen LLM: directory (e.g. from trainer.base_llm), .gguf file, hub id or smollm2-135m-instruct."""
    data: str = "synthetic"
    """"synthetic[:entities]", "squad", "archivalqa" or a JSONL path pattern with {split}."""
    out: str = "runs/cmt"
    seed: int = 0
    epochs: int = 3
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs); the LR schedule still spans the epochs,
    so a stopped run can be resumed exactly."""
    max_seconds: float = 0.0
    """Stop after this much wall time (0 = no limit); validation and the best checkpoint still happen."""
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    # objective terms
    alpha: float = 0.0
    """Memory-aware objective weight (0 = off); recorded as the checkpoint's inference α."""
    self_match_weight: float = 0.1
    self_match_lambda: float = 0.1
    contrastive_weight: float = 0.1
    """Extra InfoNCE retrieval loss on the keys (not in the paper; 0 = off)."""
    top_k: int = 4
    use_top_k: bool = True
    force_gold: bool = True
    distractors: int = 8
    """Sampled training documents added to each batch's bank, beside the batch's own documents."""
    hard_distractors: bool = True
    """Add the other reports about the same entity (superseded facts) to the bank."""
    # module sizes
    memory_tokens: int = 8
    memory_dim: int = 384
    compressor_layers: int = 2
    key_from_backbone: bool = True
    """Retrieval key = the backbone's mean-pooled embedding + a learned correction (False: learned only)."""
    lexical_key_weight: float = 0.5
    """β of the key's hashed lexical part (IDF of the training documents at the start, then learned; 0 = off):
    without it the dense key confuses invented names that share pieces ("Preirdusk Labs", "Douskveis Labs")."""
    aggregator_layers: int = 2
    heads: int = 8
    prefix_len: int = 8
    aligner_hidden: int = 256
    max_docs: int = 32
    recency_margin: float = 0.0
    """Recorded in the checkpoint: at inference, newer reports within this key-score margin of the best are
    selected first (AggregatorConfig.recency_margin); training selects by score with the gold forced in."""
    # bookkeeping
    ckpt_every: int = 200
    valid_questions: int = 200
    train_limit: int = 0
    """Use only the first N training documents (0 = all)."""
    device: str = "auto"
    cache_backbone: bool = True
    """Cache the frozen backbone's hidden states per text (exact: the backbone is frozen)."""
    progress: bool = True
    resume: bool = False
    """Continue from <out>/last (optimizer, schedule, data position and RNG states included)."""

    def cmt_config(self) -> CMTConfig:
        return CMTConfig(
            compressor=CompressorConfig(
                num_memory_tokens=self.memory_tokens, memory_dim=self.memory_dim,
                num_layers=self.compressor_layers, num_heads=self.heads, key_from_backbone=self.key_from_backbone,
                lexical_key_weight=self.lexical_key_weight,
            ),
            aggregator=AggregatorConfig(
                top_k=min(self.top_k, self.max_docs), max_docs=self.max_docs, num_layers=self.aggregator_layers, num_heads=self.heads,
                recency_margin=self.recency_margin,
            ),
            aligner=AlignerConfig(prefix_len=self.prefix_len, hidden_dim=self.aligner_hidden),
        )

    def objective(self) -> ObjectiveConfig:
        return ObjectiveConfig(
            top_k=self.top_k, alpha=self.alpha, self_match_weight=self.self_match_weight,
            self_match_lambda=self.self_match_lambda, contrastive_weight=self.contrastive_weight, force_gold=self.force_gold, use_top_k=self.use_top_k,
        )


# ---- helpers -----------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        valid = attention_mask.bool()
        keys = [tuple(ids[m].tolist()) for ids, m in zip(input_ids, valid)]
        missing = sorted({i for i, k in enumerate(keys) if k not in self.cache})
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            with torch.no_grad():
                hidden = self.inner(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).last_hidden_state
            for j, i in enumerate(missing):
                self.cache[keys[i]] = hidden[j][valid[i]].detach()
        B, L = input_ids.shape
        first = self.cache[keys[0]]
        out = first.new_zeros(B, L, first.shape[-1])
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
    idx: Sequence[int], train: Sequence[QAExample], docs: dict[str, dict[str, Any]], doc_ids: Sequence[str],
    config: TrainConfig, rng: random.Random,
) -> QABatch:
    batch = [train[i] for i in idx]
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
    room = (config.max_docs if not config.use_top_k else 10**9) - len(batch)
    extra = extra[: max(0, room)]
    return QABatch(
        documents=[e.document for e in batch],
        questions=[e.question for e in batch],
        answers=[e.answers[0] for e in batch],
        timestamps=torch.tensor([e.timestamp for e in batch], dtype=torch.float64),
        distractors=[docs[d]["text"] for d in extra],
        distractor_timestamps=torch.tensor([timestamp(docs[d].get("date")) for d in extra], dtype=torch.float64),
    )


# ---- training -------------------------------------------------------------------------------------------


def train(config: TrainConfig, llm: HFCausalLM | None = None, train_docs=None, valid_docs=None) -> dict[str, Any]:
    """Train; returns the log (also written to <out>/train_log.json). Data and LLM may be passed in."""
    from trainer.evaluate import (
        evaluate_cmt,  # late import: evaluate imports this module's helpers
    )

    seed_everything(config.seed)
    device = resolve_device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = llm or HFCausalLM.from_pretrained(config.llm, device=device)
    train_docs = train_docs if train_docs is not None else load_source(config.data, "train", seed=config.seed)
    valid_docs = valid_docs if valid_docs is not None else load_source(config.data, "valid", seed=config.seed)
    if config.train_limit:
        train_docs = train_docs[: config.train_limit]
    train_ex, valid_ex = examples(train_docs), examples(valid_docs)[: config.valid_questions]
    if not train_ex:
        raise ValueError("no training questions")
    docs_by_id = {d["doc_id"]: d for d in train_docs}
    doc_ids = list(docs_by_id)

    last_dir, best_dir = out / "last", out / "best"
    state: dict[str, Any] | None = None
    if config.resume and (last_dir / STATE_FILE).is_file():
        modules, _ = load_checkpoint(last_dir, llm.identity, llm.layout, device=device)
        state = torch.load(last_dir / STATE_FILE, map_location="cpu", weights_only=False)
        changed = {k for k, v in asdict(config).items() if state["config"].get(k) != v} - {"epochs", "max_steps", "max_seconds", "progress", "resume"}
        if changed:
            tqdm.write(f"warning: resuming with changed settings {sorted(changed)}")
    else:
        if config.resume:
            tqdm.write(f"no training state in {last_dir}: starting from scratch")
        modules = CMTModules.build(config.cmt_config(), llm.layout)
        # questions count as texts too: words only questions use ("what", "did") must not weigh most
        modules.compressor.fit_lexical_idf([d["text"] for d in train_docs] + [e.question for e in train_ex])
        modules = modules.to(device)
    modules.train()
    params = [p for p in modules.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(make_batches(train_ex, config.batch_size, random.Random(0))) / config.grad_accum)
    total = steps_per_epoch * config.epochs  # the schedule spans the epochs; max_steps/max_seconds only cut it short
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, config.warmup)) * max(0.05, 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    )
    log: dict[str, Any] = {"config": asdict(config), "steps": [], "valid": [], "device": str(device)}
    step, epoch0, batch0, best_em, best_recall = 0, 0, 0, -1.0, -1.0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch0, batch0, best_em, log = state["step"], state["epoch"], state["batch"], state["best_em"], state["log"]
        best_recall = state.get("best_recall", -1.0)
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["py_rng"])

    cache = CachedBackbone(modules.compressor.backbone) if config.cache_backbone and not config.cmt_config().compressor.train_backbone else None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    objective = config.objective()
    start = time.perf_counter() - log.get("seconds", 0.0)
    stop, resume_at = False, (config.epochs, 0)

    def save_last(epoch: int, batch: int) -> None:
        save_checkpoint(last_dir, modules, llm.identity, {"step": step, "alpha": config.alpha})
        log["seconds"] = time.perf_counter() - start
        torch.save(
            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "epoch": epoch, "batch": batch,
             "best_em": best_em, "best_recall": best_recall, "log": log, "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(), "config": asdict(config)},
            last_dir / STATE_FILE,
        )

    def validate(epoch: int) -> None:
        nonlocal best_em, best_recall
        with use_cached_backbone(modules, cache):
            result = evaluate_cmt(modules, llm, valid_docs, valid_ex, alpha=config.alpha, top_k=config.top_k if config.use_top_k else None)
        modules.train()
        entry = {"epoch": epoch, "step": step, **{k: result[k] for k in ("em", "f1", "prefix_em", "recall_at_1", "n")}}
        log["valid"].append(entry)
        tqdm.write(f"epoch {epoch}: valid EM {entry['em']:.1f} F1 {entry['f1']:.1f} recall@1 {entry['recall_at_1']:.1f}")
        if (entry["em"], entry["recall_at_1"]) > (best_em, best_recall):  # equal EM: the better retrieval wins
            best_em, best_recall = entry["em"], entry["recall_at_1"]
            save_checkpoint(best_dir, modules, llm.identity, {"alpha": config.alpha, "valid": entry, "step": step, "train_config": asdict(config)})

    if state is None and valid_ex:  # the start is a candidate too: a run whose training only hurts never ships worse than its start
        validate(-1)
    for epoch in range(epoch0, config.epochs):
        batches = make_batches(train_ex, config.batch_size, random.Random(config.seed * 1000 + epoch))
        bar = tqdm(total=len(batches), initial=batch0, desc=f"epoch {epoch}", disable=not config.progress, mininterval=2, leave=False)
        window: list[dict[str, float]] = []
        for b in range(batch0, len(batches)):
            rng = random.Random(f"{config.seed}-{epoch}-{b}")  # per batch: a resumed run samples the same distractors
            qa_batch = build_qa_batch(batches[b], train_ex, docs_by_id, doc_ids, config, rng)
            with use_cached_backbone(modules, cache), amp:
                terms = qa_objective(modules, llm, qa_batch, objective)
            (terms.total / config.grad_accum).backward()
            window.append({"loss": terms.total.item(), "qa": terms.qa.item(), "sm": terms.self_match.item(), "hits": terms.retrieval_hits})
            bar.update(1)
            if (b + 1) % config.grad_accum and b + 1 < len(batches):
                continue
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            log["steps"].append({"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0], **mean})
            window = []
            bar.set_postfix(loss=f"{mean['loss']:.3f}", qa=f"{mean['qa']:.3f}", hits=f"{mean['hits']:.2f}")
            if config.ckpt_every and step % config.ckpt_every == 0:
                save_last(epoch, b + 1)
            if (config.max_steps and step >= config.max_steps) or (config.max_seconds and time.perf_counter() - start > config.max_seconds):
                stop, resume_at = True, (epoch, b + 1)
                break
        bar.close()
        batch0 = 0
        if valid_ex:
            validate(epoch)
        if stop:
            break
    if not valid_ex:  # nothing to choose by: the last state is the best one
        save_checkpoint(best_dir, modules, llm.identity, {"alpha": config.alpha, "step": step, "train_config": asdict(config)})
    save_last(*(resume_at if stop else (config.epochs, 0)))
    log["seconds"] = time.perf_counter() - start
    log["best_valid_em"] = best_em
    (out / "train_log.json").write_text(json.dumps(log, indent=2))
    return log


def parse_args(argv: list[str] | None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if not config.llm:
        parser.error("--llm (an LLM directory, .gguf file, hub id or smollm2-135m-instruct) is required")
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    log = train(config)
    print(json.dumps({"best_valid_em": log["best_valid_em"], "valid": log["valid"], "seconds": round(log["seconds"], 1), "out": config.out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
