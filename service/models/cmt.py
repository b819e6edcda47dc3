"""The trainable trio (Θ, ψ, π) and the pipeline that joins it to a frozen LLM.

Letters: B questions, N docs in a bank, K selected docs, k memory tokens, d_m memory width.

    question ─► Θ ─► key ─► top-k over bank keys ─► memories newest first ─► ψ ─► M* ─► π ─► prefix
                 └─► Θ(q) tokens (ψ's queries, unless queries="memories") ──┘             │
    prompt (profile) "Question: …\nAnswer:" ────────────────────────────► frozen LLM (prefix) ◄──┘
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from service.errors import InvalidInputError
from service.models.aggregator import (
    Aggregator,
    Selection,
    order_newest_first,
    recency_candidates,
    select_recent,
    select_top_k,
    select_top_k_recent,
)
from service.models.aligner import Aligner
from service.models.compressor import Compressed, Compressor
from service.models.config import CMTConfig
from service.models.llm import Generation, GenerationConfig, LLMBackend
from service.models.prefix import KVLayout, KVPrefix
from service.models.prompts import PromptProfile, get_profile
from service.models.sentence_rerank import Reranker
from service.models.slot_select import question_token_ids, question_tokens, read_slots, select_slots, slot_scores


class CMTModules(nn.Module):
    """Θ, ψ, π: everything the trainer trains and a checkpoint holds."""

    def __init__(self, config: CMTConfig, compressor: Compressor, layout: KVLayout) -> None:
        super().__init__()
        c = config.compressor
        self.config = config
        self.compressor = compressor
        self.aggregator = Aggregator(config.aggregator, c.memory_dim, config.slots_read)
        self.aligner = Aligner(config.aligner, layout, c.memory_dim, config.slots_read)
        self.reranker: Reranker | None = None
        """AggregatorConfig.rerank_candidates: what re-scores the candidates, through Θ's key encoder and lexical
        key (not a submodule: nothing of it is trained or saved)."""
        if config.aggregator.rerank_candidates and compressor.key_encoder is not None:
            self.reranker = Reranker.build(config.aggregator, compressor)

    @classmethod
    def build(cls, config: CMTConfig, layout: KVLayout) -> CMTModules:
        """Fresh modules around the backbone the config names (randomly initialised heads)."""
        return cls(config, Compressor.from_backbone(config.compressor), layout)

    @property
    def device(self) -> torch.device:
        return self.compressor.device

    def candidates(self, top_k: int, margin: float) -> int:
        """How many best documents by key score a selection of top_k with this recency margin chooses from."""
        pool = recency_candidates(top_k) if margin > 0 else top_k
        return max(pool, self.config.aggregator.rerank_candidates) if self.reranker is not None else pool

    def select(self, questions: Sequence[str], keys: torch.Tensor, bank: Bank, top_k: int) -> Selection:
        """The top_k documents (B, K) of the bank for questions and their keys (B, d_k): by key score and the
        recency rule, after re-scoring the best rerank_candidates (`Reranker`) when the config asks for it."""
        a = self.config.aggregator
        bank_keys = bank.keys.to(keys.device)
        if self.reranker is None:
            return select_top_k_recent(keys, bank_keys, bank.timestamps, top_k, a.recency_margin)
        if not bank.texts:
            raise InvalidInputError("AggregatorConfig.rerank_candidates needs the bank's texts (Bank.texts)")
        pool = select_top_k(keys, bank_keys, self.candidates(top_k, a.recency_margin))  # (B, C)
        texts = [[bank.texts[i] if i >= 0 else None for i in row] for row in pool.indices.tolist()]
        scores = self.reranker(questions, keys, pool.scores, texts)  # (B, C)
        K = min(top_k, pool.indices.shape[1])
        times = bank.timestamps.double()[pool.indices.clamp(min=0).cpu()].tolist()  # (B, C)
        rows = [select_recent(s, t, K, a.recency_margin) for s, t in zip(scores.tolist(), times, strict=True)]
        order = torch.tensor(rows, dtype=torch.long).view(-1, K).to(pool.indices.device)  # (B, K)
        return Selection(pool.indices.gather(1, order), scores.to(pool.scores).gather(1, order))

    def choose_slots(
        self, questions: Sequence[str], ids: torch.Tensor, weights: torch.Tensor, doc_mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """AggregatorConfig.select_slots: the p slots (B, p) among the selected documents' stored picks (ids,
        weights (B, K, k, m); doc_mask (B, K), False = padding) each question reads, as indices into K·k
        (`slot_select.read_slots`); None when ψ reads every slot."""
        a = self.config.aggregator
        if not a.select_slots:
            return None
        salience = self.compressor.token_pool.token_salience.detach()  # (V,)
        token_ids = question_token_ids(self.compressor.tokenizer, questions, a.select_case_forms)
        asked = question_tokens(token_ids, salience, a.select_min_salience)  # (B, V)
        scores = slot_scores(asked, ids.to(salience.device), weights.to(salience.device), salience, a.select_width,
                             a.select_own_weight, a.select_pull,
                             spaced=self.config.compressor.pick_rule == "spaced")  # (B, K, k)
        return select_slots(scores, a.select_slots, doc_mask)  # (B, p)

    def prefix(
        self, question: torch.Tensor, memories: torch.Tensor, doc_mask: torch.Tensor, llm: LLMBackend | None = None,
        slots: torch.Tensor | None = None,
    ) -> tuple[KVPrefix | None, torch.Tensor]:
        """ψ then π. question (B, k, d_m), memories (B, K, k, d_m), doc_mask (B, K), slots (B, p) the slots read
        (`choose_slots`) or None for all; the frozen LLM is read by an "embeddings" aligner only.

        Returns the prefix (None when no row has any memory) and has_memory (B,): rows without
        memory get their prefix masked out, so the frozen LLM answers them alone.
        """
        has_memory = doc_mask.any(dim=1)  # (B,)
        if not bool(has_memory.any()):
            return None, has_memory
        if slots is not None:
            memories, doc_mask = read_slots(memories, doc_mask, slots)  # (B, 1, p, d_m), (B, 1)
        m_star = self.aggregator(question, memories, doc_mask)  # (B, p, d_m)
        return self.aligner(m_star, llm), has_memory


@dataclass
class Bank:
    """An in-memory bank (tests, trainer evaluation); the service reads the same from Redis."""

    memories: torch.Tensor  # (N, k, d_m)
    keys: torch.Tensor  # (N, d_k)
    timestamps: torch.Tensor  # (N,) seconds; newer is larger
    ids: list[str] = field(default_factory=list)
    picks: tuple[torch.Tensor, torch.Tensor] | None = None
    """The memories' token picks, ids (N, k, m) and weights (N, k, m), when Θ stores picks."""
    texts: list[str] = field(default_factory=list)
    """The documents' texts (for AggregatorConfig.rerank_candidates); empty when not kept."""

    def __post_init__(self) -> None:
        N = self.memories.shape[0]
        if (self.keys.shape[0] != N or self.timestamps.shape != (N,) or (self.ids and len(self.ids) != N)
                or (self.texts and len(self.texts) != N)):
            raise InvalidInputError("bank memories, keys, timestamps, ids and texts must have one row per document")
        if not self.ids:
            self.ids = [str(i) for i in range(N)]

    @classmethod
    def empty(cls, num_memory_tokens: int, memory_dim: int, key_dim: int | None = None) -> Bank:
        key_dim = memory_dim if key_dim is None else key_dim
        return cls(torch.empty(0, num_memory_tokens, memory_dim), torch.empty(0, key_dim), torch.empty(0))

    def gather(self, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected memories (B, K, k, d_m) and doc_mask (B, K)."""
        mask = selection.mask  # (B, K)
        rows = selection.indices.clamp(min=0).to(self.memories.device)  # (B, K)
        memories = self.memories[rows]  # (B, K, k, d_m)
        return memories * mask[..., None, None].to(memories), mask

    def gather_picks(self, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected memories' token picks: ids (B, K, k, m) and weights (B, K, k, m)."""
        if self.picks is None:
            raise InvalidInputError("this bank holds no token picks (CompressorConfig.stored_picks is 0)")
        rows = selection.indices.clamp(min=0).cpu()  # (B, K)
        return self.picks[0][rows], self.picks[1][rows]


@dataclass
class Answer:
    generation: Generation
    source_ids: list[str]
    scores: list[float]

    @property
    def text(self) -> str:
        return self.generation.text


class CMTPipeline:
    """Θ/ψ/π plus a frozen LLM: compress documents, answer questions from a bank."""

    def __init__(self, modules: CMTModules, llm: LLMBackend, profile: PromptProfile | None = None) -> None:
        if modules.aligner.layout != llm.layout:
            raise InvalidInputError(f"aligner built for {modules.aligner.layout}, LLM needs {llm.layout}")
        self.modules = modules.eval()
        self.llm = llm
        self.profile = get_profile(profile)

    def compress(self, texts: Sequence[str], batch_size: int = 32) -> Compressed:
        """Θ over texts in batches; memory (B, k, d_m), key (B, d_m)."""
        parts = [self.modules.compressor.compress(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        picks = None
        if parts[0].picks is not None:
            picks = (torch.cat([p.picks[0] for p in parts]), torch.cat([p.picks[1] for p in parts]))
        return Compressed(torch.cat([p.memory for p in parts]), torch.cat([p.key for p in parts]), picks)

    def prompts(self, questions: Sequence[str]) -> list[str]:
        return [self.profile.question_text(self.llm.tokenizer, q) for q in questions]

    @torch.inference_mode()
    def answer(
        self,
        questions: Sequence[str],
        bank: Bank,
        top_k: int | None = None,
        generation: GenerationConfig = GenerationConfig(),
    ) -> list[Answer]:
        top_k = top_k or self.modules.config.aggregator.top_k
        q = self.compress(questions)  # memory (B, k, d_m), key (B, d_m)
        selection = order_newest_first(self.modules.select(questions, q.key, bank, top_k), bank.timestamps)
        memories, doc_mask = bank.gather(selection)  # (B, K, k, d_m), (B, K)
        slots = None
        if self.modules.config.aggregator.select_slots:
            slots = self.modules.choose_slots(questions, *bank.gather_picks(selection), doc_mask)  # (B, p)
        prefix, has_memory = self.modules.prefix(
            q.memory, memories.to(q.memory), doc_mask.to(q.memory.device), self.llm, slots
        )
        gens = self.llm.generate(
            self.prompts(questions), prefix, has_memory if prefix is not None else None, generation
        )
        answers = []
        for b, gen in enumerate(gens):
            valid = selection.mask[b]
            answers.append(
                Answer(
                    gen,
                    [bank.ids[i] for i in selection.indices[b][valid].tolist()],
                    selection.scores[b][valid].tolist(),
                )
            )
        return answers
