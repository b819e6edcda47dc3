"""Training objectives of CMT (docs/DESIGN.md §1), each switchable for ablations.

Letters: B examples, K selected docs, k memory tokens, d_m memory width, T answer-target length,
n prompt+answer tokens, V vocabulary.

- QA loss: cross-entropy of the answer tokens through the frozen LLM with the aligned prefix
  (question tokens and padding masked out).
- Memory-aware objective: logits = (1+α)·l(y | M*, q) − α·l(y | q).
- Self-matching: −cos(key(q_i), key(d_i)) + λ·log Σ_{j≠i} exp(−‖key(d_i) − key(d_j)‖²).
- Top-k aggregation over the batch's documents plus distractors, with the gold document forced
  into the selection (optional) so that early, random retrieval still lets ψ/π learn.
- Reconstruction warm-up (optional, ICAE-style): from the gold document's prefix alone and a few cue
  tokens of a window of the document, the frozen LLM continues that window; the loss can only fall if
  the memory carries the text, which the QA loss alone does not force.
- Distillation (optional): KL between the answer distribution with the memory prefix and that of the
  same frozen LLM reading the gold paragraph in its prompt (the teacher costs one forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.errors import InvalidInputError
from service.models.aggregator import Selection, order_newest_first, select_top_k
from service.models.cmt import CMTModules
from service.models.llm import HFCausalLM
from service.models.prompts import PromptProfile, get_profile


@dataclass
class QABatch:
    documents: list[str]
    """Gold document of each example (example i's answer is in documents[i])."""
    questions: list[str]
    answers: list[str]
    timestamps: torch.Tensor | None = None
    """(B,) document times (newer larger); None = all equal."""
    distractors: Sequence[str] = ()
    """Extra documents added to the bank the questions select from."""
    distractor_timestamps: torch.Tensor | None = None
    """(len(distractors),) their times; None = older than every gold document."""
    window_starts: Sequence[float] | None = None
    """(B,) where each document's reconstruction window starts, as a fraction of the room left for it
    (drawn by the trainer's per-batch RNG); None = at the start of every document."""


@dataclass
class ObjectiveConfig:
    top_k: int = 4
    alpha: float = 0.0
    """Memory-aware weight α (0 switches the objective off)."""
    self_match_weight: float = 1.0
    """Weight of the self-matching loss (0 switches it off)."""
    self_match_lambda: float = 0.1
    """λ of the repulsion term inside self-matching."""
    force_gold: bool = True
    """Put the gold document into the selection when top-k missed it."""
    use_top_k: bool = True
    """False = attend to the whole bank (the MAC-style ablation)."""
    contrastive_weight: float = 0.0
    """Weight of an extra InfoNCE retrieval loss (question key vs every bank document's key, the
    gold one as target); not in the paper: it trains the top-k key much faster than self-matching."""
    contrastive_temperature: float = 0.05
    distill_weight: float = 0.0
    """Weight of the KL to the same frozen LLM reading the gold paragraph in its prompt (0 = off; costs
    one teacher forward per batch)."""
    distill_temperature: float = 1.0
    """Softmax temperature of that KL."""
    reconstruct_weight: float = 0.0
    """Weight of the reconstruction warm-up loss (0 = off; costs one LLM pass over cue + target tokens)."""
    reconstruct_cue_tokens: int = 8
    """Tokens of the document's window given after the prefix as a cue."""
    reconstruct_tokens: int = 48
    """Tokens of the document after the cue that the LLM must produce from the prefix."""

    def __post_init__(self) -> None:
        for name in ("reconstruct_cue_tokens", "reconstruct_tokens"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"ObjectiveConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("alpha", "self_match_weight", "contrastive_weight", "distill_weight", "reconstruct_weight"):
            if not getattr(self, name) >= 0:
                raise InvalidInputError(f"ObjectiveConfig.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class LossTerms:
    total: torch.Tensor
    qa: torch.Tensor
    self_match: torch.Tensor
    retrieval_hits: float
    """Share of examples whose gold document top-k selected by itself."""
    contrastive: torch.Tensor | None = None
    distill: torch.Tensor | None = None
    reconstruct: torch.Tensor | None = None
    tokens: int = 0
    """LLM positions this batch fed: prompt+answer ids (padding included) per pass, plus the prefix."""
    answer_tokens: int = 0
    """Answer tokens the QA loss averages over."""


def left_padded(llm: HFCausalLM, rows: Sequence[list[int]], label_rows: Sequence[list[int]]):
    """Token rows → left-padded ids (B, n), mask (B, n) and labels (B, n) (-100 on padding), on the LLM's device."""
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), llm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, n - len(r) :], mask[i, n - len(r) :], labels[i, n - len(r) :] = torch.tensor(r), 1, torch.tensor(lab)
    return ids.to(llm.device), mask.to(llm.device), labels.to(llm.device)


def prompt_answer_ids(llm: HFCausalLM, prompts: Sequence[str], answers: Sequence[str]):
    """Left-padded prompt+answer ids (B, n), mask (B, n), labels (B, n) with -100 outside answers.
    The answer ids are the same whatever the prompt, so two calls label the same tokens."""
    tok = llm.tokenizer
    rows, label_rows = [], []
    for prompt_text, a in zip(prompts, answers, strict=True):
        prompt = tok(prompt_text)["input_ids"]
        target = tok(" " + a.strip())["input_ids"] + [tok.eos_token_id]
        rows.append(prompt + target)
        label_rows.append([-100] * len(prompt) + target)
    return left_padded(llm, rows, label_rows)


def answer_targets(
    llm: HFCausalLM, questions: Sequence[str], answers: Sequence[str], profile: PromptProfile | None = None
):
    """The student's rows: the question alone (the memory comes as the prefix)."""
    profile = get_profile(profile)
    return prompt_answer_ids(llm, [profile.question_text(llm.tokenizer, q) for q in questions], answers)


def teacher_targets(
    llm: HFCausalLM, questions: Sequence[str], documents: Sequence[str], answers: Sequence[str],
    profile: PromptProfile | None = None,
):
    """The teacher's rows: the same LLM reading the gold paragraph in its prompt."""
    profile = get_profile(profile)
    prompts = [profile.context_text(llm.tokenizer, q, [d]) for q, d in zip(questions, documents, strict=True)]
    return prompt_answer_ids(llm, prompts, answers)


def distillation_loss(
    student: torch.Tensor, student_labels: torch.Tensor, teacher: torch.Tensor, teacher_labels: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher ‖ student) per answer token (xRAG / PISCO): the memory path learns to make the LLM
    answer as it does when it reads the paragraph. student (B, n, V), teacher (B, n', V); labels mark
    the same answer tokens in both (prompt_answer_ids), so their positions pair up in order."""
    s = student[:, :-1][student_labels[:, 1:] != -100].float() / temperature  # (T, V)
    t = teacher[:, :-1][teacher_labels[:, 1:] != -100].float() / temperature  # (T, V)
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def reconstruction_rows(
    llm: HFCausalLM, documents: Sequence[str], starts: Sequence[float] | None, cue: int, length: int
):
    """Left-padded cue+target ids (B, n), mask (B, n), labels (B, n) with -100 outside the targets: a window
    of each document (cue tokens, then up to `length` tokens to produce), starting at starts[i] of the room
    left (documents shorter than the window give what they have)."""
    tok = llm.tokenizer
    rows, label_rows = [], []
    for i, text in enumerate(documents):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        room = max(0, len(ids) - cue - length)
        at = int((starts[i] if starts is not None else 0.0) * room)
        window = ids[at : at + cue + length]
        rows.append(window)
        label_rows.append([-100] * min(cue, len(window)) + window[cue:])
    return left_padded(llm, rows, label_rows)


def reconstruction_loss(
    modules: CMTModules, llm: HFCausalLM, question: torch.Tensor, memory: torch.Tensor, batch: QABatch,
    config: ObjectiveConfig, picks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """Cross-entropy of each gold document's window after its own memory's prefix; question (B, k, d_m)
    and memory (B, k, d_m) of the gold documents, and their token picks (B, k, m) when stored (with
    select_slots no question is asked: the p most salient slots are read). Returns the loss and the LLM
    positions fed."""
    B = memory.shape[0]
    slots = None
    if picks is not None and modules.config.aggregator.select_slots:
        slots = modules.choose_slots([""] * B, picks[0][:, None], picks[1][:, None])  # (B, p)
    prefix, has_memory = modules.prefix(
        question, memory[:, None], torch.ones(B, 1, dtype=torch.bool, device=memory.device), llm, slots
    )
    ids, mask, labels = reconstruction_rows(
        llm, batch.documents, batch.window_starts, config.reconstruct_cue_tokens, config.reconstruct_tokens
    )
    logits = llm.forward_logits(ids, mask, prefix, has_memory)  # (B, n, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    return loss, ids.numel() + B * prefix.length


def self_matching_loss(question_keys: torch.Tensor, doc_keys: torch.Tensor, lam: float) -> torch.Tensor:
    """question_keys, doc_keys (B, d_m) L2-normalised; example i's gold doc is row i."""
    attract = -(question_keys * doc_keys).sum(dim=-1)  # (B,) −cos
    dist2 = torch.cdist(doc_keys, doc_keys).pow(2)  # (B, B)
    others = ~torch.eye(len(doc_keys), dtype=torch.bool, device=doc_keys.device)  # (B, B)
    repel = torch.logsumexp((-dist2).masked_fill(~others, float("-inf")), dim=1)  # (B,)
    if len(doc_keys) < 2:
        repel = torch.zeros_like(attract)
    return (attract + lam * repel).mean()


def _force_gold(selection: Selection, gold: torch.Tensor) -> Selection:
    """Replace the lowest-scored pick by the gold row (B,) where top-k missed it."""
    indices, scores = selection.indices.clone(), selection.scores.clone()
    missed = ~(indices == gold[:, None]).any(dim=1)  # (B,)
    indices[missed, -1] = gold[missed]
    return Selection(indices, scores)


def qa_objective(
    modules: CMTModules, llm: HFCausalLM, batch: QABatch, config: ObjectiveConfig, profile: PromptProfile | None = None
) -> LossTerms:
    B = len(batch.questions)
    if not (B == len(batch.documents) == len(batch.answers)) or B == 0:
        raise InvalidInputError("a QA batch needs as many documents, questions and answers, at least one")
    compressor = modules.compressor
    docs = compressor(compressor.tokenize(list(batch.documents) + list(batch.distractors)))  # (N, k, d_m)
    questions = compressor(compressor.tokenize(batch.questions))  # (B, k, d_m)
    N = docs.key.shape[0]
    gold_times = torch.zeros(B) if batch.timestamps is None else batch.timestamps.double()
    other_times = (
        torch.full((N - B,), float("-inf"), dtype=torch.float64)
        if batch.distractor_timestamps is None
        else batch.distractor_timestamps.double()
    )
    timestamps = torch.cat([gold_times, other_times])  # (N,)
    gold = torch.arange(B, device=docs.key.device)  # (B,)

    top_k = min(config.top_k, N) if config.use_top_k else N
    selection = select_top_k(questions.key.detach(), docs.key.detach(), top_k)
    hits = (selection.indices == gold[:, None]).any(dim=1).float().mean().item()
    if config.force_gold and config.use_top_k:
        selection = _force_gold(selection, gold)
    selection = order_newest_first(selection, timestamps)
    memories = docs.memory[selection.indices]  # (B, K, k, d_m)
    slots = None  # as served: the slots each question chooses of its documents (AggregatorConfig.select_slots)
    if docs.picks is not None and modules.config.aggregator.select_slots:
        rows = selection.indices.clamp(min=0)  # (B, K)
        slots = modules.choose_slots(batch.questions, docs.picks[0][rows], docs.picks[1][rows],
                                     selection.mask)  # (B, p)
    prefix, has_memory = modules.prefix(questions.memory, memories, selection.mask, llm, slots)

    ids, mask, labels = answer_targets(llm, batch.questions, batch.answers, profile)
    logits = llm.forward_logits(ids, mask, prefix, has_memory)  # (B, n, V)
    if config.alpha > 0:
        with torch.no_grad():
            bare = llm.forward_logits(ids, mask)  # (B, n, V)
        logits = (1 + config.alpha) * logits - config.alpha * bare
    qa = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    sm = self_matching_loss(questions.key, docs.key[:B], config.self_match_lambda)
    total = qa + config.self_match_weight * sm if config.self_match_weight > 0 else qa
    contrastive = None
    if config.contrastive_weight > 0:
        contrastive = contrastive_retrieval_loss(questions.key, docs.key, config.contrastive_temperature)
        total = total + config.contrastive_weight * contrastive
    distill = None
    if config.distill_weight > 0:
        with torch.no_grad():
            t_ids, t_mask, t_labels = teacher_targets(llm, batch.questions, batch.documents, batch.answers, profile)
            teacher = llm.forward_logits(t_ids, t_mask)  # (B, n', V)
        distill = distillation_loss(logits, labels, teacher, t_labels, config.distill_temperature)
        total = total + config.distill_weight * distill
    reconstruct = None
    if config.reconstruct_weight > 0:
        gold_picks = None if docs.picks is None else (docs.picks[0][:B], docs.picks[1][:B])
        reconstruct, rec_tokens = reconstruction_loss(modules, llm, questions.memory, docs.memory[:B], batch, config,
                                                      gold_picks)
        total = total + config.reconstruct_weight * reconstruct
    passes = 2 if config.alpha > 0 else 1  # the memory-aware objective adds a pass without memory
    tokens = passes * ids.numel() + (B * prefix.length if prefix is not None else 0)
    if distill is not None:
        tokens += t_ids.numel()
    if reconstruct is not None:
        tokens += rec_tokens
    return LossTerms(total=total, qa=qa, self_match=sm, retrieval_hits=hits, contrastive=contrastive, distill=distill,
                     reconstruct=reconstruct, tokens=tokens, answer_tokens=int((labels != -100).sum()))


def contrastive_retrieval_loss(
    question_keys: torch.Tensor, bank_keys: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE: question_keys (B, d_m) against bank_keys (N, d_m), N >= B, gold of question i is row i."""
    logits = question_keys @ bank_keys.T / temperature  # (B, N)
    return F.cross_entropy(logits.float(), torch.arange(len(question_keys), device=logits.device))
