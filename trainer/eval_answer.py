"""Answering for the evaluation: prompts built from a prompt profile, cached prompt-only answers, and
CMT answers from an in-memory bank. Every row asks the same frozen LLM with the same greedy settings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from service.errors import InvalidInputError
from service.models.cmt import Bank, CMTModules, CMTPipeline
from service.models.llm import GenerationConfig, HFCausalLM
from service.models.prompts import PromptProfile, get_profile
from trainer.data import QAExample, timestamp
from trainer.prediction_cache import CachedPrediction, PredictionCache
from trainer.scoring import aggregate

MAX_NEW_TOKENS = 16
BATCH_SIZE = 32
"""Questions per LLM batch, the same for every row (prompt-only and CMT)."""


def generation_config(
    alpha: float = 0.0, max_new_tokens: int = MAX_NEW_TOKENS, profile: PromptProfile | None = None
) -> GenerationConfig:
    """Greedy, at most max_new_tokens, stopping at the profile's stop strings (one line = one answer)."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens, alpha=alpha, stop_strings=tuple(get_profile(profile).stop_strings)
    )


# ---- prompts -----------------------------------------------------------------------------------------


def prompt_text(
    llm: HFCausalLM, profile: PromptProfile, question: str, documents: str | Sequence[str] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> str:
    """What the LLM reads: the question alone (documents None) or the documents then the question.

    Documents too long for the LLM's positions (prompt + max_new_tokens) are cut at their end, the
    last document first, so the best-ranked document of a RAG top-k prompt is kept whole longest."""
    tok = llm.tokenizer
    if documents is None:
        text = profile.question_text(tok, question)
        docs: list[str] = []
    else:
        docs = [documents] if isinstance(documents, str) else list(documents)
        text = profile.context_text(tok, question, docs)
    if llm.layout.max_positions is None:
        return text
    limit = llm.layout.max_positions - max_new_tokens - 2
    for _ in range(5):  # decode/encode round trips may shift a token or two: re-measure
        over = len(tok(text)["input_ids"]) - limit
        if over <= 0:
            return text
        ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
        if sum(len(x) for x in ids) <= len(ids):
            break
        over += 2
        for i in reversed(range(len(ids))):
            cut = min(over, len(ids[i]) - 1)
            if cut > 0:
                ids[i], over = ids[i][:-cut], over - cut
            if over <= 0:
                break
        docs = [tok.decode(x) for x in ids]
        text = profile.context_text(tok, question, docs)
    if len(tok(text)["input_ids"]) <= limit:
        return text
    raise InvalidInputError(
        f"prompt profile {profile.name!r}: the prompt needs {len(tok(text)['input_ids'])} positions even with its "
        "documents cut; "
        f"the LLM has {llm.layout.max_positions}, {max_new_tokens} + 2 of them kept for the answer"
    )


def fit_prompt(
    llm: HFCausalLM, question: str, document: str | Sequence[str] | None, profile: PromptProfile | str | None = None
) -> str:
    """prompt_text with the profile given by name, dict or object (default: plain)."""
    return prompt_text(llm, get_profile(profile), question, document)


def question_tokens(llm: HFCausalLM, profile: PromptProfile, questions: Sequence[str]) -> list[int]:
    """Prompt length in tokens of each question alone under the profile (what follows a CMT prefix)."""
    return [len(llm.tokenizer(profile.question_text(llm.tokenizer, q))["input_ids"]) for q in questions]


# ---- prompt-only rows (no memory, gold, RAG): cached ----------------------------------------------------


@dataclass
class PromptRun:
    predictions: list[str]
    prompt_tokens: list[int]
    seconds: list[float]
    """Measured wall seconds per question of the batch that computed each answer (now or when cached)."""
    fresh: int
    """Distinct prompts computed now."""
    cached: int
    """Distinct prompts found in the cache."""


def run_prompts(
    llm: HFCausalLM, prompts: Sequence[str], cache: PredictionCache, batch_size: int = BATCH_SIZE,
    desc: str | None = None, progress: bool = False,
) -> PromptRun:
    """Answers of prompt-only questions with the cache's generation settings: each distinct prompt is
    looked up once, the missing ones generated in batches of batch_size (sorted by length: less
    padding), timed per batch, and stored."""
    found: dict[str, CachedPrediction] = {}
    todo = []
    for p in dict.fromkeys(prompts):
        hit = cache.get(p)
        if hit is None:
            todo.append(p)
        else:
            found[p] = hit
    todo.sort(key=len)
    for i in tqdm(range(0, len(todo), batch_size), desc=desc, disable=not progress or not todo, leave=False):
        batch = todo[i : i + batch_size]
        t = time.perf_counter()
        gens = llm.generate(batch, config=cache.generation)
        per_question = (time.perf_counter() - t) / len(batch)
        new = {p: CachedPrediction(g.text, g.prompt_tokens, per_question) for p, g in zip(batch, gens, strict=True)}
        cache.put_many(new)
        found.update(new)
    hits = [found[p] for p in prompts]
    return PromptRun([h.text for h in hits], [h.prompt_tokens for h in hits], [h.seconds for h in hits],
                     fresh=len(todo), cached=len(found) - len(todo))


def time_prompts(
    llm: HFCausalLM, prompts: Sequence[str], generation: GenerationConfig, batch_size: int = BATCH_SIZE
) -> tuple[float, list[str]]:
    """Wall seconds to answer prompts in the given order, in batches of batch_size, without any cache
    (the timing sample), and the answers."""
    preds: list[str] = []
    t = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        preds += [g.text for g in llm.generate(list(prompts[i : i + batch_size]), config=generation)]
    return time.perf_counter() - t, preds


def answer_prompts(
    llm: HFCausalLM, prompts: Sequence[str], batch_size: int = BATCH_SIZE, *,
    profile: PromptProfile | str | None = None, cache: PredictionCache | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> tuple[list[str], list[int]]:
    """Answers and prompt lengths of prompts built with `profile` (default plain); no disk cache unless given."""
    profile = get_profile(profile)
    cache = cache or PredictionCache(
        None, llm, profile, generation_config(0.0, max_new_tokens, profile), llm_identity={}
    )
    run = run_prompts(llm, prompts, cache, batch_size)
    return run.predictions, run.prompt_tokens


# ---- CMT ------------------------------------------------------------------------------------------------


def compress_bank(modules: CMTModules, docs: Sequence[dict[str, Any]], batch_size: int = 64) -> Bank:
    """Θ over every document, in stream order; timestamps from the dates (else the stream position)."""
    modules.eval()
    mem, keys, ids, weights = [], [], [], []
    for i in range(0, len(docs), batch_size):
        c = modules.compressor.compress([d["text"] for d in docs[i : i + batch_size]])
        mem.append(c.memory.float().cpu())
        keys.append(c.key.float().cpu())
        if c.picks is not None:  # what the service stores: ids and fp16 weights
            ids.append(c.picks[0].cpu())
            weights.append(c.picks[1].to("cpu", torch.float16))
    times = [timestamp(d.get("date")) or float(i) for i, d in enumerate(docs)]
    picks = (torch.cat(ids), torch.cat(weights)) if ids else None
    return Bank(torch.cat(mem), torch.cat(keys), torch.tensor(times, dtype=torch.float64), [d["doc_id"] for d in docs],
                picks, [d["text"] for d in docs])


def whole_bank_k(modules: CMTModules, bank: Bank) -> int:
    """How many documents "the whole bank" is for ψ: all of them, capped at the aggregator's max_docs
    (its order embeddings); a larger bank gives the max_docs best by key score."""
    return min(max(1, len(bank.ids)), modules.config.aggregator.max_docs)


def answer_cmt(
    modules: CMTModules, llm: HFCausalLM, bank: Bank, questions: Sequence[str], top_k: int | None, alpha: float = 0.0,
    batch_size: int = BATCH_SIZE, max_new_tokens: int = MAX_NEW_TOKENS, profile: PromptProfile | str | None = None,
    desc: str | None = None, progress: bool = False, batch_seconds: list[float] | None = None,
) -> tuple[list[str], list[list[str]]]:
    """CMT answers and the selected document ids. top_k None = the whole bank up to max_docs
    (whole_bank_k). profile: the checkpoint's prompt profile (default plain). batch_seconds, when
    given, receives the wall seconds of each batch (Θ(question), selection, ψ, π, generation)."""
    profile = get_profile(profile)
    pipeline = CMTPipeline(modules, llm, profile)
    k = top_k or whole_bank_k(modules, bank)
    bank = Bank(bank.memories.to(modules.device), bank.keys.to(modules.device), bank.timestamps, bank.ids, bank.picks,
                bank.texts)
    generation = generation_config(alpha, max_new_tokens, profile)
    preds, sources = [], []
    for i in tqdm(range(0, len(questions), batch_size), desc=desc, disable=not progress or not questions, leave=False):
        t = time.perf_counter()
        answers = pipeline.answer(list(questions[i : i + batch_size]), bank, top_k=k, generation=generation)
        if batch_seconds is not None:
            batch_seconds.append(time.perf_counter() - t)
        for a in answers:
            preds.append(a.text)
            sources.append(a.source_ids)
    return preds, sources


def evaluate_cmt(
    modules: CMTModules, llm: HFCausalLM, docs: Sequence[dict[str, Any]], exs: Sequence[QAExample],
    alpha: float = 0.0, top_k: int | None = 4, bank: Bank | None = None, profile: PromptProfile | str | None = None,
) -> dict[str, Any]:
    """Stream docs into a bank, ask the examples' questions with the given prompt profile (default
    plain; pass the checkpoint's); EM/F1/prefix-EM/containment (× 100), answer words and recall@1."""
    was_training = modules.training
    bank = bank if bank is not None else compress_bank(modules, docs)
    preds, sources = answer_cmt(modules, llm, bank, [e.question for e in exs], top_k, alpha, profile=profile)
    result = aggregate(preds, [e.answers for e in exs])
    # recall@1 of the selection (sources are reordered newest first, so recompute the top-1), in eval mode
    result["recall_at_1"] = 0.0
    if exs:
        with torch.no_grad():
            q = modules.compressor.compress([e.question for e in exs])
            sel = modules.select([e.question for e in exs], q.key.float().cpu(), bank, 1)
        top1 = [bank.ids[i] for i in sel.indices[:, 0].tolist()]
        result["recall_at_1"] = 100.0 * sum(t == e.doc_id for t, e in zip(top1, exs, strict=True)) / len(exs)
    modules.train(was_training)
    result["predictions"] = preds
    result["sources"] = sources
    return result
