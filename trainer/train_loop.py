"""The trainer's parts, in the order `trainer.train.train` calls them: setup (seed, device, frozen LLM,
data), modules (new or resumed), optimizer and schedule, one epoch, validation, checkpoints.
Batches and their helpers: trainer.train_batches.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from service.errors import InvalidInputError, PayloadTooLargeError
from service.models.checkpoint import load_checkpoint, save_checkpoint
from service.models.cmt import CMTModules
from service.models.compressor import Compressor
from service.models.llm import HFCausalLM
from service.models.prompts import PROFILES, PromptProfile
from trainer.cli_config import flatten
from trainer.data import QAExample
from trainer.eval_answer import evaluate_cmt
from trainer.mixture import Mixture
from trainer.objectives import qa_objective
from trainer.train_batches import (
    CachedBackbone,
    autocast,
    build_qa_batch,
    make_batches,
    use_cached_backbone,
)

if TYPE_CHECKING:
    from trainer.train import TrainConfig

STATE_FILE = "trainer_state.pt"
RESUME_MAY_CHANGE = {"epochs", "max_steps", "max_seconds", "progress", "resume"}
"""Settings a resumed run may change without a warning."""


@dataclass
class Run:
    """Everything one training run holds; the functions below fill and advance it."""

    config: TrainConfig
    device: torch.device
    out: Path
    llm: HFCausalLM
    train: Mixture
    valid: Mixture
    profile: PromptProfile
    log: dict[str, Any]
    valid_ex: list[QAExample] = field(default_factory=list)
    modules: CMTModules | None = None
    opt: torch.optim.Optimizer | None = None
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    cache: CachedBackbone | None = None
    step: int = 0
    epoch: int = 0
    batch: int = 0
    """First batch of `epoch` still to train (non-zero only in the epoch a resumed run stopped in)."""
    best: tuple[float, ...] | None = None
    """Ranking key of the best validation so far: (EM, F1, -valid answer loss)."""
    start: float = 0.0
    stopped_at: tuple[int, int] | None = None
    """(epoch, next batch) where max_steps/max_seconds stopped the run; None while it runs."""

    @property
    def docs_by_id(self) -> dict[str, dict[str, Any]]:
        return {d["doc_id"]: d for d in self.train.documents}


# ---- setup ----------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup(
    config: TrainConfig, llm: HFCausalLM | None, train_docs: Sequence[dict] | None, valid_docs: Sequence[dict] | None
) -> Run:
    """Seed, device, output folder, the frozen LLM (loaded unless given) and the data (loaded unless given)."""
    seed_everything(config.seed)
    device = resolve_device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = llm or HFCausalLM.from_pretrained(config.llm, device=device, dtype=getattr(torch, config.llm_dtype))
    limit = config.train_limit or None
    train = (Mixture.from_docs(train_docs, limit) if train_docs is not None
             else Mixture.load(config.data, "train", config.seed, limit))
    valid = (Mixture.from_docs(valid_docs) if valid_docs is not None
             else Mixture.load(config.valid_data or config.data, config.valid_split, config.seed))
    if not train.num_questions():
        raise ValueError("no training questions")
    log = {"config": asdict(config), "steps": [], "valid": [], "device": str(device)}
    return Run(config, device, out, llm, train, valid, PROFILES[config.prompt_profile], log)


def load_state(run: Run) -> dict[str, Any] | None:
    """The trainer state of <out>/last when resuming (None: start from scratch)."""
    path = run.out / "last" / STATE_FILE
    if not run.config.resume:
        return None
    if not path.is_file():
        tqdm.write(f"no training state in {path.parent}: starting from scratch")
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    old, new = flatten(state["config"]), flatten(asdict(run.config))
    changed = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)} - RESUME_MAY_CHANGE
    if changed:
        tqdm.write(f"warning: resuming with changed settings {sorted(changed)}")
    return state


# ---- modules ----------------------------------------------------------------------------------------------


def fits(compressor: Compressor, text: str) -> bool:
    """Whether Θ accepts the text (it refuses, never cuts, texts over max_chunks windows)."""
    c = compressor.config
    if len(text.encode("utf-8")) <= c.max_chunks * (c.chunk_tokens - c.chunk_overlap - 2):  # tokens <= bytes
        return True
    try:
        compressor.tokenize([text])
    except PayloadTooLargeError:
        return False
    return True


def build_or_resume_modules(run: Run, state: dict[str, Any] | None) -> CMTModules:
    """Θ/ψ/π from <out>/last when resuming, else new ones. Documents Θ refuses are dropped from the data
    (with their questions; counted in the log); new modules start their lexical key at the IDF of the
    training texts, questions included (words only questions use, "what", "did", must not weigh most)."""
    config = run.config
    if state is not None:
        modules, _ = load_checkpoint(run.out / "last", run.llm.identity, run.llm.layout, device=run.device)
    else:
        modules = CMTModules.build(config.cmt_config(), run.llm.layout)
        if config.init_from:
            init_weights(modules, config.init_from, run.llm)
    freeze_all_but(modules, config.train_only)
    run.train, dropped_train = run.train.filtered(lambda d: fits(modules.compressor, d["text"]))
    run.valid, dropped_valid = run.valid.filtered(lambda d: fits(modules.compressor, d["text"]))
    run.valid_ex = run.valid.first_questions(config.valid_questions)
    run.log["data"] = {"train": run.train.describe(), "valid": run.valid.describe(),
                       "dropped_too_long": {"train": dropped_train, "valid": dropped_valid}}
    if state is None and not config.init_from:  # a checkpoint to start from brings its own IDF
        texts = ([d["text"] for d in run.train.documents]
                 + [e.question for exs in run.train.examples.values() for e in exs])
        modules.compressor.fit_lexical_idf(texts)
    if state is None:
        modules = modules.to(run.device)
    modules.train()
    frozen = config.cache_backbone and not config.compressor.train_backbone
    run.cache = CachedBackbone(modules.compressor.backbone) if frozen else None
    return modules


def init_weights(modules: CMTModules, checkpoint: str, llm: HFCausalLM) -> None:
    """Copy a checkpoint's Θ/ψ/π weights into freshly built modules of the same shapes."""
    source, _ = load_checkpoint(checkpoint, llm.identity, llm.layout)
    for name in ("compressor", "aggregator", "aligner"):
        try:
            getattr(modules, name).load_state_dict(getattr(source, name).state_dict())
        except RuntimeError as exc:
            raise ValueError(f"--init-from {checkpoint}: its {name} does not fit the configured one: {exc}") from exc


# ---- optimizer and schedule -------------------------------------------------------------------------------


def make_optimizer(
    run: Run, state: dict[str, Any] | None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW; linear warmup then cosine decay to 5% over all epochs (max_steps/max_seconds only cut the run
    short, so a stopped run resumes on the same schedule); both restored when resuming."""
    config = run.config
    opt = torch.optim.AdamW(trainable(run.modules), lr=config.lr, weight_decay=config.weight_decay)
    epoch0 = run.train.epoch(0, config.seed, config.epoch_questions)
    steps_per_epoch = math.ceil(len(make_batches(epoch0, config.batch_size, random.Random(0))) / config.grad_accum)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / max(1, config.warmup))
        * max(0.05, 0.5 * (1 + math.cos(math.pi * min(s, total) / total))),
    )
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    return opt, sched


def freeze_all_but(modules: CMTModules, prefixes: str) -> None:
    """TrainConfig.train_only: only parameters whose name starts with one of the prefixes get gradients."""
    wanted = [p.strip() for p in prefixes.split(",") if p.strip()]
    if not wanted:
        return
    names = [name for name, _ in modules.named_parameters()]
    unknown = [w for w in wanted if not any(n.startswith(w) for n in names)]
    if unknown:
        raise InvalidInputError(f"--train-only names no parameter: {unknown}")
    for name, param in modules.named_parameters():
        if not name.startswith("compressor.backbone."):  # a frozen backbone stays frozen either way
            param.requires_grad_(any(name.startswith(w) for w in wanted))


def trainable(modules: CMTModules) -> list[nn.Parameter]:
    return [p for p in modules.parameters() if p.requires_grad]


def restore_progress(run: Run, state: dict[str, Any] | None) -> None:
    """Step, data position, best validation so far, log and RNG states of a resumed run; the clock."""
    if state is not None:
        run.step, run.epoch, run.batch, run.log = state["step"], state["epoch"], state["batch"], state["log"]
        run.best = tuple(state["best"]) if state.get("best") is not None else None
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["py_rng"])
    run.start = time.perf_counter() - run.log.get("seconds", 0.0)


# ---- one epoch ------------------------------------------------------------------------------------------


def train_epoch(run: Run, epoch: int) -> bool:
    """Train one epoch from batch run.batch on; True when max_steps/max_seconds stopped it."""
    config, modules = run.config, run.modules
    examples = run.train.epoch(epoch, config.seed, config.epoch_questions)
    batches = make_batches(examples, config.batch_size, random.Random(config.seed * 1000 + epoch))
    docs_by_id = run.docs_by_id
    doc_ids = list(docs_by_id)
    objective = config.objective
    bar = tqdm(total=len(batches), initial=run.batch, desc=f"epoch {epoch}", disable=not config.progress, mininterval=2,
               leave=False)
    window: list[dict[str, float]] = []
    tick = time.perf_counter()
    for b in range(run.batch, len(batches)):
        rng = random.Random(f"{config.seed}-{epoch}-{b}")  # per batch: a resumed run samples the same distractors
        qa_batch = build_qa_batch(batches[b], examples, docs_by_id, doc_ids, config, rng)
        with use_cached_backbone(modules, run.cache), autocast(run.device):
            terms = qa_objective(modules, run.llm, qa_batch, objective, run.profile)
        (terms.total / config.grad_accum).backward()
        window.append({"loss": terms.total.item(), "qa": terms.qa.item(), "sm": terms.self_match.item(),
                       "rec": terms.reconstruct.item() if terms.reconstruct is not None else 0.0,
                       "hits": terms.retrieval_hits, "questions": len(qa_batch.questions), "tokens": terms.tokens})
        bar.update(1)
        if (b + 1) % config.grad_accum and b + 1 < len(batches):
            continue
        optimizer_step(run)
        tick = log_step(run, epoch, window, tick)
        window = []
        bar.set_postfix(loss=f"{run.log['steps'][-1]['loss']:.3f}", qa=f"{run.log['steps'][-1]['qa']:.3f}")
        if config.ckpt_every and run.step % config.ckpt_every == 0:
            save_last(run, epoch, b + 1)
        if ((config.max_steps and run.step >= config.max_steps)
                or (config.max_seconds and time.perf_counter() - run.start > config.max_seconds)):
            run.stopped_at = (epoch, b + 1)
            break
    bar.close()
    run.batch = 0
    return run.stopped_at is not None


def optimizer_step(run: Run) -> None:
    torch.nn.utils.clip_grad_norm_(trainable(run.modules), 1.0)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    run.step += 1


def log_step(run: Run, epoch: int, window: list[dict[str, float]], tick: float) -> float:
    """Append one optimizer step to the log: mean losses of its micro-batches and its throughput
    (LLM tokens/s: prompt+answer ids and prefix positions fed; questions/s). Returns the new tick."""
    now = time.perf_counter()
    seconds = max(now - tick, 1e-9)
    mean = {k: sum(w[k] for w in window) / len(window) for k in ("loss", "qa", "sm", "rec", "hits")}
    tokens, questions = sum(w["tokens"] for w in window), sum(w["questions"] for w in window)
    run.log["steps"].append({
        "step": run.step, "epoch": epoch, "lr": run.sched.get_last_lr()[0], **mean, "seconds": seconds,
        "tokens": tokens, "tokens_per_s": tokens / seconds, "examples_per_s": questions / seconds,
    })
    return now


# ---- validation -----------------------------------------------------------------------------------------


def valid_answer_loss(run: Run) -> tuple[float, int]:
    """Mean answer-token cross-entropy of the validation questions with the CMT prefix (the training QA
    term, no gradients) over batches built as in training (distractors from the validation documents,
    the same every time); and the number of answer tokens."""
    config, modules = run.config, run.modules
    docs_by_id = {d["doc_id"]: d for d in run.valid.documents}
    doc_ids = list(docs_by_id)
    rng = random.Random(f"{config.seed}-valid")
    total, count = 0.0, 0
    modules.eval()
    with torch.no_grad(), use_cached_backbone(modules, run.cache), autocast(run.device):
        for idx in make_batches(run.valid_ex, config.batch_size, random.Random(config.seed)):
            batch = build_qa_batch(idx, run.valid_ex, docs_by_id, doc_ids, config, rng)
            terms = qa_objective(modules, run.llm, batch, config.objective, run.profile)
            total += terms.qa.item() * terms.answer_tokens
            count += terms.answer_tokens
    modules.train()
    return total / max(1, count), count


def validate(run: Run, epoch: int) -> None:
    """EM/F1/recall@1 of the streamed validation and the valid answer loss; the best by (EM, F1, -loss),
    so that a run whose EM stays 0 still keeps its best reader rather than its start."""
    config = run.config
    top_k = config.aggregator.top_k if config.objective.use_top_k else None
    with use_cached_backbone(run.modules, run.cache):
        result = evaluate_cmt(run.modules, run.llm, run.valid.documents, run.valid_ex, alpha=config.objective.alpha,
                              top_k=top_k, profile=run.profile)
    run.modules.train()
    loss, answer_tokens = valid_answer_loss(run)
    entry = {"epoch": epoch, "step": run.step, **{k: result[k] for k in ("em", "f1", "prefix_em", "recall_at_1", "n")},
             "valid_loss": loss, "valid_answer_tokens": answer_tokens}
    key = (entry["em"], entry["f1"], -loss)
    entry["is_best"] = run.best is None or key > run.best  # equal keys: the earlier one stays
    run.log["valid"].append(entry)
    tqdm.write(f"epoch {epoch}: valid EM {entry['em']:.1f} F1 {entry['f1']:.1f} loss {loss:.4f} "
               f"recall@1 {entry['recall_at_1']:.1f}"
               + (" (best)" if entry["is_best"] else ""))
    if entry["is_best"]:
        run.best = key
        run.log["best"] = {"epoch": epoch, "step": run.step, "rule": "(em, f1, -valid_loss)", "key": list(key)}
        save_best(run, {"valid": entry})


# ---- checkpoints --------------------------------------------------------------------------------------------


def save_best(run: Run, extra: dict[str, Any]) -> None:
    metrics = {"alpha": run.config.objective.alpha, **extra, "step": run.step, "train_config": asdict(run.config)}
    save_checkpoint(run.out / "best", run.modules, run.llm.identity, metrics, prompt_profile=run.profile)


def save_last(run: Run, epoch: int, batch: int) -> None:
    """<out>/last: the modules and all a resumed run needs (optimizer, schedule, data position, RNG)."""
    last = run.out / "last"
    save_checkpoint(last, run.modules, run.llm.identity, {"step": run.step, "alpha": run.config.objective.alpha},
                    prompt_profile=run.profile)
    run.log["seconds"] = time.perf_counter() - run.start
    torch.save(
        {"optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(), "step": run.step, "epoch": epoch,
         "batch": batch,
         "best": list(run.best) if run.best is not None else None, "log": run.log, "torch_rng": torch.get_rng_state(),
         "py_rng": random.getstate(), "config": asdict(run.config)},
        last / STATE_FILE,
    )


def finish(run: Run) -> dict[str, Any]:
    """Last checkpoint (best too when nothing was validated) and <out>/train_log.json; returns the log."""
    if not run.valid_ex:  # nothing to choose by: the last state is the best one
        save_best(run, {})
    save_last(run, *(run.stopped_at or (run.config.epochs, 0)))
    run.log["seconds"] = time.perf_counter() - run.start
    best = next((v for v in reversed(run.log["valid"]) if v.get("is_best")), None)
    run.log["best_valid_em"] = best["em"] if best else -1.0
    (run.out / "train_log.json").write_text(json.dumps(run.log, indent=2))
    return run.log
