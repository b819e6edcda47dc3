"""POST /ask: encode → retrieve → fetch → aggregate → align → generate, batched across requests.

Letters: B questions in a batch, K most docs selected in it, k memory tokens, d_m memory width.

Concurrent questions with the same generation settings are answered in one LLM call: every
prefix has the same length p, so batching costs only left padding of the prompts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from service.errors import InvalidInputError, PayloadTooLargeError, StorageUnavailableError
from service.models.aggregator import newest_first, select_recent
from service.models.llm import Generation, GenerationConfig, TextPieces
from service.models.prefix import KVPrefix
from service.models.slot_select import read_slots
from service.runtime.batcher import MicroBatcher
from service.runtime.engine import Engine
from service.settings import Settings
from service.storage.base import MemoryStore, SearchFilters
from service.storage.index import SearchHit
from service.storage.sync import SyncedIndex


@dataclass(frozen=True)
class AskItem:
    question: str
    top_k: int
    generation: GenerationConfig
    filters: SearchFilters = SearchFilters()
    recency_margin: float = 0.0
    """Newer reports within this key-score margin of the best are picked first (select_recent)."""


@dataclass
class AskResult:
    generation: Generation
    sources: list[SearchHit]
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1


@dataclass
class Prepared:
    """A question ready to decode: its prompt, its prefix row (batch 1) or None, sources, stage timings."""

    prompt: str
    prefix: KVPrefix | None
    sources: list[SearchHit]
    timings_ms: dict[str, float]


def hits_newest_first(hits: list[SearchHit]) -> list[SearchHit]:
    """The hits in the recency order training uses (service.models.aggregator.newest_first)."""
    times = [(h.published_at or h.received_at).timestamp() for h in hits]
    return [hits[j] for j in newest_first(times, [h.score for h in hits])]


@dataclass
class AskService:
    engine: Engine
    store: MemoryStore
    index: SyncedIndex
    settings: Settings

    def item(
        self, question: str, top_k: int | None, max_new_tokens: int | None, alpha: float | None, filters: SearchFilters,
        recency_margin: float | None = None, **sampling,
    ) -> AskItem:
        """Validate one request against the limits; clear 4xx errors."""
        if not question.strip():
            raise InvalidInputError("question must not be empty")
        if len(question) > self.settings.max_question_chars:
            raise PayloadTooLargeError(
                f"question has {len(question)} characters; the limit is {self.settings.max_question_chars}"
            )
        top_k = self.engine.default_top_k if top_k is None else top_k
        limit = min(self.settings.max_top_k, self.engine.max_top_k)
        if not 1 <= top_k <= limit:
            raise InvalidInputError(f"top_k must be between 1 and {limit}, got {top_k}")
        max_new = self.settings.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        if not 1 <= max_new <= self.settings.max_new_tokens:
            raise InvalidInputError(
                f"max_new_tokens must be between 1 and {self.settings.max_new_tokens}, got {max_new}"
            )
        alpha = self.engine.default_alpha if alpha is None else alpha
        refusal = getattr(self.engine.llm, "alpha_refusal", None)  # the vLLM engine serves α = 0 only
        if refusal and alpha > 0:
            raise InvalidInputError(refusal, details={"alpha": alpha})
        margin = self.engine.modules.config.aggregator.recency_margin if recency_margin is None else recency_margin
        if not 0 <= margin <= 2:
            raise InvalidInputError(f"recency_margin must be between 0 and 2 (cosine units), got {margin}")
        # The profile's stop strings (one line is one answer) end every answer, besides the request's own.
        stops = tuple(dict.fromkeys((*sampling.pop("stop_strings", ()), *self.engine.profile.stop_strings)))
        generation = GenerationConfig(max_new_tokens=max_new, alpha=alpha, stop_strings=stops, **sampling)
        return AskItem(question, top_k, generation, filters, margin)

    # ---- stages (run in the batcher's thread) ------------------------------------------------

    def _retrieve(
        self, keys: torch.Tensor, items: list[AskItem], lap: Callable[[str], None] = lambda stage: None
    ) -> list[list[SearchHit]]:
        """Each question's top_k hits: the index's best candidates by key score, re-scored by their sentences when
        the checkpoint asks for it (AggregatorConfig.rerank_candidates), then chosen with the recency rule. `lap`
        marks the end of the "retrieve" and "rerank" stages."""
        if self.index.last_error is not None and len(self.index) == 0:
            raise StorageUnavailableError(f"the memory index is not available: {self.index.last_error.message}")
        modules = self.engine.modules
        found = [
            self.index.search(keys[i], modules.candidates(item.top_k, item.recency_margin), item.filters,
                              compressor_version=self.engine.compressor_version)
            for i, item in enumerate(items)
        ]
        lap("retrieve")
        if modules.reranker is not None:
            found = self._rerank([item.question for item in items], keys, found)
            lap("rerank")
        chosen = []
        for item, hits in zip(items, found, strict=True):
            times = [(h.published_at or h.received_at).timestamp() for h in hits]
            chosen.append([hits[j] for j in select_recent([h.score for h in hits], times, item.top_k,
                                                            item.recency_margin)])
        return chosen

    def _rerank(
        self, questions: list[str], keys: torch.Tensor, found: list[list[SearchHit]]
    ) -> list[list[SearchHit]]:
        """The hits with their re-ranked scores (`sentence_rerank.Reranker`), from the stored texts
        read in one Redis round trip; a document deleted meanwhile keeps its key score (the fetch drops it)."""
        ids = sorted({h.id for row in found for h in row})
        if not ids:
            return found
        texts = dict(zip(ids, (row[0] for row in self.store.get_docs_meta(ids, ["text"])), strict=True))
        C = max(len(row) for row in found)
        pool = torch.full((len(found), C), float("-inf"))  # (B, C)
        for b, row in enumerate(found):
            pool[b, : len(row)] = torch.tensor([h.score for h in row])
        pool_texts = [[texts[h.id] for h in row] + [None] * (C - len(row)) for row in found]
        scores = self.engine.modules.reranker(questions, keys, pool, pool_texts)  # (B, C)
        return [[h if texts[h.id] is None else dataclasses.replace(h, score=float(scores[b, j]))
                 for j, h in enumerate(row)] for b, row in enumerate(found)]

    def _fetch(
        self, hits: list[list[SearchHit]], questions: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[SearchHit]]]:
        """Memories (B, K, k, d_m) newest first and doc_mask (B, K), in one Redis round trip; with
        AggregatorConfig.select_slots the p slots each question chooses among them, as one memory
        (B, 1, p, d_m) and doc_mask (B, 1) (`slot_select.read_slots`).

        A document deleted between search and fetch is a miss and simply left out.
        """
        ordered = [hits_newest_first(row) for row in hits]  # recency rank 0 = newest
        ids = sorted({h.id for row in ordered for h in row})
        stored = dict(
            zip(ids, self.store.get_memories(ids, compressor_version=self.engine.compressor_version), strict=True)
        )
        kept = [[h for h in row if stored.get(h.id) is not None] for row in ordered]
        found = [i for i in ids if stored[i] is not None]
        dense = dict(zip(found, self.engine.dense_memories([stored[i].memory for i in found]), strict=True))
        B, K = len(kept), max((len(r) for r in kept), default=0)
        k, d_m = self.engine.num_memory_tokens, self.engine.modules.config.compressor.memory_dim
        memories = torch.zeros(B, K, k, d_m, dtype=torch.float16)  # (B, K, k, d_m)
        mask = torch.zeros(B, K, dtype=torch.bool)  # (B, K)
        for b, row in enumerate(kept):
            for j, hit in enumerate(row):
                memories[b, j] = dense[hit.id]
                mask[b, j] = True
        slots = self.engine.choose_slots(questions, [[stored[h.id].memory for h in row] for row in kept], K)
        if slots is not None:
            memories, mask = read_slots(memories, mask, slots)  # (B, 1, p, d_m), (B, 1)
        return memories, mask, kept

    def _prefix_batch(
        self, items: list[AskItem]
    ) -> tuple[KVPrefix | None, torch.Tensor, list[list[SearchHit]], dict[str, float]]:
        """encode → retrieve → fetch → aggregate → align for a batch: the prefix (None when no row has
        memory), has_memory (B,), the sources and the stage timings (ms)."""
        t: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            t[stage] = 1e3 * (now - clock)
            clock = now

        q = self.engine.encode_questions([it.question for it in items])  # memory (B, k, d_m), key (B, d_m)
        lap("encode")
        hits = self._retrieve(q.key, items, lap)
        memories, mask, hits = self._fetch(hits, [it.question for it in items])
        lap("fetch")
        prefix, has_memory = None, mask.any(dim=1)
        if bool(has_memory.any()):
            m_star = self.engine.aggregate(q.memory, memories, mask)  # (B, k, d_m)
            lap("aggregate")
            prefix = self.engine.align(m_star)
            lap("align")
        else:
            t["aggregate"] = t["align"] = 0.0
        return prefix, has_memory, hits, t

    def answer_batch(self, items: list[AskItem]) -> list[AskResult]:
        """All items share one GenerationConfig (the batcher groups by it); generated as one batch."""
        prefix, has_memory, hits, t = self._prefix_batch(items)
        start = time.perf_counter()
        gens = self.engine.generate([it.question for it in items], prefix, has_memory.to(self.engine.modules.device),
                                    items[0].generation)
        t["generate"] = 1e3 * (time.perf_counter() - start)
        return [AskResult(g, h, dict(t), len(items)) for g, h in zip(gens, hits, strict=True)]

    def prepare_batch(self, items: list[AskItem]) -> list[Prepared]:
        """Everything before generation, batched; each question then decodes in the continuous batch
        with its own prefix row (None: no memory, the bare LLM answers)."""
        prefix, has_memory, hits, t = self._prefix_batch(items)
        prompts = self.engine.prompts([it.question for it in items])
        rows = [prefix.row(b) if prefix is not None and bool(has_memory[b]) else None for b in range(len(items))]
        return [Prepared(prompts[b], rows[b], hits[b], dict(t)) for b in range(len(items))]

    def stream_one(self, item: AskItem) -> tuple[list[SearchHit], Iterator[str]]:
        """Sources, then the answer's text pieces as they are generated (server-sent events)."""
        q = self.engine.encode_questions([item.question])
        memories, mask, hits = self._fetch(self._retrieve(q.key, [item]), [item.question])
        prefix = None
        if bool(mask.any()):
            prefix = self.engine.align(self.engine.aggregate(q.memory, memories, mask))
        llm = self.engine.llm
        steps = llm.stream(self.engine.prompts([item.question]), prefix, None, item.generation)

        def pieces() -> Iterator[str]:
            text = TextPieces(llm, item.generation.stop_strings)
            for token in steps:
                piece, finished = text.add(int(token[0]))
                if piece:
                    yield piece
                if finished:
                    return

        return hits[0], pieces()


def make_prepare_batcher(service: AskService, settings: Settings, on_batch=None) -> MicroBatcher[AskItem, Prepared]:
    """Continuous batching: questions are prepared in batches (any generation settings together), then
    each joins the decode loop on its own."""
    return MicroBatcher(
        service.prepare_batch,
        name="ask",
        max_batch=settings.ask_batch_size,
        max_wait_s=settings.batch_wait_ms / 1000,
        max_queue=settings.max_queue,
        on_batch=on_batch,
    )


def make_ask_batcher(service: AskService, settings: Settings, on_batch=None) -> MicroBatcher[AskItem, AskResult]:
    return MicroBatcher(
        service.answer_batch,
        name="ask",
        max_batch=settings.ask_batch_size,
        max_wait_s=settings.batch_wait_ms / 1000,
        max_queue=settings.max_queue,
        group_key=lambda item: item.generation,
        on_batch=on_batch,
    )
