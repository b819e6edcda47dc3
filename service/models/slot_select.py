"""ψ's optional first step (AggregatorConfig.select_slots): the question chooses which p slots of its
selected documents' memories the frozen LLM reads.

Letters: B questions, K selected docs, k stored slots, m token picks per slot, p slots read, V vocabulary.

Why: a memory stored as token picks (CompressorConfig.stored_picks) costs 6 bytes a pick, so a document
can keep many more slots than the LLM should read (every slot is a prefix position of every question),
and the picks say which tokens each slot holds, so the question can choose among them. SmolLM2 answering
SQuAD valid from 32 words of the paragraph: its 32 rarest words F1 18.9, the 32 words nearest the
question's rare words F1 30.2, the whole paragraph 29.5 (bench/bench_extractive_oracle.py). Through the
memory path, gold document forced, 160 questions: 32 stretch slots F1 9.8, the best 32 of 160 one-token
slots chosen this way 20.9 (bench/bench_slot_choice.py).

A slot's score: the salience of the question's tokens it holds or its neighbours hold, decaying as
1 / (1 + distance / width) in slots (the nearest such token, or the sum over all of them: `select_pull`),
plus `own_weight` × its own salience (a rare token near nothing
asked is still worth more than a common one). Question tokens count only above `min_salience` (not
"the", "what"), and with `select_case_forms` a question typed without capitals looks for its words
Capitalised too (it finds "New Earswick"). A text shorter than k spreads its tokens over the k slots, so
slots next to each other can hold one token of the text: they count once (read once, pulling from each).
Under the "stretch" and "distinct" rules that is any run of one token, so a number the text writes with a
repeated digit ("2003" is "2", "0", "0", "3" to SmolLM2) was read as "203"; under "spaced" the continuation
slots say so with weight 0 (`spaced=True`), and a run of one token at weight 1 is the text's own, read whole.
With several documents (top-k > 1) the best p slots among all of theirs are read, as one memory (newest
document first, then text order): the prefix stays p positions, and a question whose best key match is
not its document still finds the slots that hold its words. No weights are learned: the
salience is Θ's token pool's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

_WORD_START = re.compile(r"(?<![^\W\d_])[^\W\d_]")
"""A letter not preceded by a letter: the first letter of each word ("new earswick" → "New Earswick")."""


def case_forms(question: str) -> list[str]:
    """AggregatorConfig.select_case_forms: a question typed without capitals as typed and with each of its words
    Capitalised, tokenised apart because a case-sensitive tokenizer splits "earswick" and "Earswick" differently;
    a question with a capital as typed only (its writer cased it: the forms cost SQuAD's cased questions answers)."""
    if question != question.lower():
        return [question]
    capitalised = _WORD_START.sub(lambda m: m.group(0).upper(), question)
    return list(dict.fromkeys([question, capitalised]))  # one form when nothing can be capitalised


def question_token_ids(tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], case_forms_too: bool
                       ) -> list[list[int]]:
    """Each question's token ids, with those of its other case forms (`case_forms`) when case_forms_too."""
    forms = [case_forms(q) if case_forms_too else [q] for q in questions]
    ids = iter(tokenizer([f for fs in forms for f in fs], add_special_tokens=False, verbose=False)["input_ids"])
    return [[t for _ in fs for t in next(ids)] for fs in forms]


def question_tokens(token_ids: Sequence[Sequence[int]], salience: torch.Tensor, min_salience: float) -> torch.Tensor:
    """Each question's token ids → (B, V) bool: the tokens of the question salient enough to look for."""
    asked = torch.zeros(len(token_ids), len(salience), dtype=torch.bool, device=salience.device)  # (B, V)
    for b, ids in enumerate(token_ids):
        if ids:
            asked[b, torch.as_tensor(list(ids), dtype=torch.long, device=salience.device)] = True
    return asked & (salience > min_salience)[None, :]  # (B, V)


def slot_scores(
    asked: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, salience: torch.Tensor, width: float,
    own_weight: float, pull: str = "nearest", spaced: bool = False,
) -> torch.Tensor:
    """asked (B, V), ids (B, K, k, m), weights (B, K, k, m), salience (V,) → scores (B, K, k), -inf for a slot
    that repeats the token before it. `pull`: "nearest" = the strongest single question-token match seen
    from a slot, "sum" = all of them. `spaced`: CompressorConfig.pick_rule="spaced" picks (m = 1), whose
    weight-0 slots continue the token before them."""
    B, K, k, m = ids.shape
    held = (1.0 if spaced else weights.float()) * salience[ids]  # (B, K, k, m) salience each pick carries
    hit = asked.gather(1, ids.reshape(B, -1)).view(B, K, k, m)  # (B, K, k, m) pick is a question token
    match = (held * hit).sum(-1)  # (B, K, k)
    pos = torch.arange(k, device=ids.device, dtype=torch.float32)  # (k,)
    decay = 1.0 / (1.0 + (pos[:, None] - pos[None, :]).abs() / width)  # (k, k)
    pulls = match[..., None, :] * decay  # (B, K, k, k) each match's pull on each slot
    near = pulls.amax(-1) if pull == "nearest" else pulls.sum(-1)  # (B, K, k)
    scores = near + own_weight * held.sum(-1)  # (B, K, k)
    if spaced:
        repeat = weights[..., 0] == 0  # (B, K, k) a continuation of the token before
    else:
        top = ids[..., 0]  # (B, K, k) each slot's heaviest pick (picks are stored heaviest first)
        repeat = torch.zeros_like(top, dtype=torch.bool)
        repeat[..., 1:] = top[..., 1:] == top[..., :-1]  # (B, K, k) same token as the slot before
    return scores.masked_fill(repeat, float("-inf"))


def select_slots(scores: torch.Tensor, p: int, doc_mask: torch.Tensor | None = None) -> torch.Tensor:
    """scores (B, K, k), doc_mask (B, K) (False = padding, never read) → the p best slots among all K·k of
    each question's documents (B, p), as indices into K·k, in order: document (newest first), then text."""
    B, K, k = scores.shape
    if doc_mask is not None:
        scores = scores.masked_fill(~doc_mask.to(scores.device)[..., None], float("-inf"))
    return scores.reshape(B, K * k).topk(min(p, K * k), dim=-1).indices.sort(dim=-1).values  # (B, p)


def read_slots(
    memories: torch.Tensor, doc_mask: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """memories (B, K, k, d_m), doc_mask (B, K), slots (B, p) from select_slots → the chosen slots as one
    memory (B, 1, p, d_m) and its doc_mask (B, 1): ψ then reads them as a single document."""
    B, K, k, d_m = memories.shape
    index = slots.to(memories.device)[..., None].expand(-1, -1, d_m)  # (B, p, d_m)
    chosen = memories.reshape(B, K * k, d_m).gather(1, index)  # (B, p, d_m)
    return chosen[:, None], doc_mask.any(dim=1, keepdim=True)
