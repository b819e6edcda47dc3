"""The models the service serves with: the frozen LLM and the Θ/ψ/π of one checkpoint.

Letters: B questions, K selected docs, n stored memories, k memory tokens, d_m memory width,
m token picks per slot (CompressorConfig.stored_picks).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from service.models.checkpoint import checkpoint_profile, load_checkpoint
from service.models.cmt import CMTModules
from service.models.compressor import ChunkedBatch, Compressed
from service.models.llm import Generation, GenerationConfig, HFCausalLM, LLMBackend
from service.models.prompts import PromptProfile, get_profile
from service.models.sentence_rerank import Reranker
from service.settings import Settings
from service.storage import codec

if TYPE_CHECKING:
    from service.models.vllm_llm import VLLMCausalLM

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

STORED_DTYPE = torch.float16
"""dtype of the memory and the key `Engine.compress` hands to the store: fp16 halves the bank's
bytes, and cosine top-k over fp16 keys ranks like fp32."""


def resolve_compress_dtype(settings: Settings) -> torch.dtype:
    """Settings.compress_dtype resolved for the device: "auto" is bfloat16 on CUDA only."""
    if settings.compress_dtype == "auto":
        return torch.bfloat16 if torch.device(settings.device).type == "cuda" else torch.float32
    return DTYPES[settings.compress_dtype]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on this CPU: oneDNN then runs bf16 matmuls in hardware (elsewhere it emulates them,
    slower than fp32). torch's own probes, private but stable since 2.1; a torch without them reads as False."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_llm_dtype(settings: Settings) -> torch.dtype:
    """Settings.dtype resolved for the device: "auto" is bfloat16 on CUDA and on a CPU with native bf16."""
    if settings.dtype == "auto":
        device = torch.device(settings.device).type
        native = device == "cuda" or (device == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    return DTYPES[settings.dtype]


@dataclass
class Engine:
    llm: LLMBackend
    """The frozen LLM behind the serving interface: HFCausalLM, or VLLMCausalLM under CMT_ENGINE=vllm."""
    modules: CMTModules
    compressor_version: str
    checkpoint_dir: Path
    load_seconds: float
    default_alpha: float = 0.0
    """Memory-aware α the checkpoint was trained with: the /ask default when a request gives none."""
    profile: PromptProfile = get_profile(None)
    """How the checkpoint asks its LLM (recorded at training time); its stop strings end every answer."""
    compress_dtype: torch.dtype = torch.float32
    """Θ's compute dtype (Settings.compress_dtype resolved): bfloat16 runs Θ under autocast."""

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        """The LLM and the checkpoint the settings name (by default SmolLM2 and the shipped checkpoint)."""
        start = time.perf_counter()
        backend: type[HFCausalLM] | type[VLLMCausalLM] = HFCausalLM
        if settings.engine == "vllm":  # vLLM itself is imported only now (a clear error if it is not installed)
            from service.models.vllm_llm import VLLMCausalLM as backend
        dtype = resolve_llm_dtype(settings)
        llm = backend.from_pretrained(settings.llm, device=settings.device, dtype=dtype,
                                      cache_dir=settings.llm_cache_dir)
        checkpoint = settings.checkpoint  # a missing or foreign one is refused with a message naming both LLMs
        modules, config = load_checkpoint(checkpoint, llm.identity, llm.layout, settings.device)
        if modules.reranker is not None:
            modules.reranker = Reranker.build(modules.config.aggregator, modules.compressor,
                                              settings.rerank_cache_docs)
        alpha = float(config.get("metrics", {}).get("alpha", 0.0))
        if alpha > 0 and getattr(llm, "alpha_refusal", None):  # requests may not ask for it; nor may the default
            log.warning("checkpoint trained with alpha=%s; the %s engine answers with alpha=0", alpha, settings.engine)
            alpha = 0.0
        engine = cls(llm, modules, config["compressor_version"], Path(checkpoint), time.perf_counter() - start, alpha,
                     checkpoint_profile(config), resolve_compress_dtype(settings))
        log.info("loaded LLM %s (%s) and checkpoint %s (compressor %s) in %.1fs", settings.llm, dtype,
                 checkpoint, engine.compressor_version, engine.load_seconds)
        return engine

    @property
    def num_memory_tokens(self) -> int:
        return self.modules.config.compressor.num_memory_tokens

    @property
    def default_top_k(self) -> int:
        return self.modules.config.aggregator.top_k

    @property
    def max_top_k(self) -> int:
        return self.modules.config.aggregator.max_docs

    def tokenize(self, texts: Sequence[str]) -> ChunkedBatch:
        """Θ's input, on the CPU; refuses empty or over-long texts. The ingest batcher's first stage, which
        runs on its own thread while Θ computes the batch before."""
        return self.modules.compressor.tokenize(list(texts))

    def _theta(self, batch: ChunkedBatch) -> Compressed:
        """Θ in the compute dtype; bfloat16 through autocast, whose outputs may be bf16 or fp32."""
        autocast = (torch.autocast(self.modules.device.type, dtype=self.compress_dtype)
                    if self.compress_dtype != torch.float32 else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            return self.modules.compressor(batch)

    def compress_tokenized(self, batch: ChunkedBatch) -> Compressed:
        """Θ on CPU/GPU; what is stored comes back on the CPU in fp16: the key, and the memory, or its token
        picks (ids int64) when the checkpoint stores picks; the memory then stays where Θ made it, uncopied
        (k × d_m values a document that ingest would only throw away)."""
        out = self._theta(batch)
        key = out.key.to("cpu", STORED_DTYPE)
        if out.picks is None:
            return Compressed(out.memory.to("cpu", STORED_DTYPE), key)
        return Compressed(out.memory, key, (out.picks[0].cpu(), out.picks[1].to("cpu", STORED_DTYPE)))

    def compress(self, texts: Sequence[str]) -> Compressed:
        return self.compress_tokenized(self.tokenize(texts))

    @staticmethod
    def stored_memories(out: Compressed) -> list[codec.Memory]:
        """What the bank stores of each document of `compress`'s batch: its token picks (k, m) when the
        checkpoint stores picks, else its memory (k, d_m)."""
        if out.picks is None:
            return list(out.memory.unbind(0))
        return [codec.TokenPicks(ids, weights) for ids, weights in zip(*out.picks, strict=True)]

    @torch.inference_mode()
    def dense_memories(self, stored: Sequence[codec.Memory]) -> torch.Tensor:
        """Stored memories read back → (n, k, d_m) on the CPU in fp16; token picks are rebuilt from Θ's
        token embeddings (one lookup for all of them)."""
        k, d_m = self.num_memory_tokens, self.modules.config.compressor.memory_dim
        out = torch.empty(len(stored), k, d_m, dtype=STORED_DTYPE)  # (n, k, d_m)
        picked = []
        for i, m in enumerate(stored):
            if isinstance(m, codec.TokenPicks):
                picked.append(i)
            else:
                out[i] = m
        if picked:
            ids = torch.stack([stored[i].ids for i in picked])  # (n', k, m)
            weights = torch.stack([stored[i].weights for i in picked])  # (n', k, m)
            out[picked] = self.modules.compressor.memory_from_picks(ids, weights).to("cpu", STORED_DTYPE)
        return out

    def choose_slots(self, questions: Sequence[str], stored: Sequence[Sequence[codec.Memory]], K: int
                     ) -> torch.Tensor | None:
        """AggregatorConfig.select_slots: the slots (B, p) each question reads of its documents' stored token
        picks (a row of up to K per question; missing ones are padding), indices into K·k on the CPU
        (`slot_select.read_slots`); None = every slot."""
        c = self.modules.config
        if not c.aggregator.select_slots:
            return None
        k, m = self.num_memory_tokens, c.compressor.stored_picks
        ids = torch.zeros(len(stored), K, k, m, dtype=torch.long)  # (B, K, k, m)
        weights = torch.zeros(len(stored), K, k, m, dtype=STORED_DTYPE)  # (B, K, k, m)
        doc_mask = torch.zeros(len(stored), K, dtype=torch.bool)  # (B, K)
        for b, row in enumerate(stored):
            for j, picks in enumerate(row):
                ids[b, j], weights[b, j], doc_mask[b, j] = picks.ids, picks.weights, True
        with torch.inference_mode():
            return self.modules.choose_slots(questions, ids, weights, doc_mask).cpu()

    def memory_value_bytes(self, compressor_version: str | None = None) -> int:
        """Bytes of one stored memory value as `compress` makes it (default: this checkpoint's version)."""
        cv = self.compressor_version if compressor_version is None else compressor_version
        c = self.modules.config.compressor
        per_slot = c.stored_picks or c.memory_dim
        return codec.encoded_size(self.num_memory_tokens, per_slot, cv, key_dtype=STORED_DTYPE,
                                  memory_dtype=STORED_DTYPE, d_k=c.retrieval_key_dim, picks=bool(c.stored_picks))

    def encode_questions(self, questions: Sequence[str]) -> Compressed:
        """Θ(q) kept on the model's device in fp32 (ψ reads its tokens), computed like the documents' keys."""
        out = self._theta(self.tokenize(questions))
        return Compressed(out.memory.float(), out.key.float())

    @torch.inference_mode()
    def aggregate(self, question: torch.Tensor, memories: torch.Tensor, doc_mask: torch.Tensor) -> torch.Tensor:
        """ψ: question (B, k, d_m), memories (B, K, k, d_m) newest first, doc_mask (B, K) → M* (B, k, d_m)."""
        device = self.modules.device
        return self.modules.aggregator(question.to(device), memories.to(device, torch.float32), doc_mask.to(device))

    @torch.inference_mode()
    def align(self, m_star: torch.Tensor):
        return self.modules.aligner(m_star, self.llm)

    def prompts(self, questions: Sequence[str]) -> list[str]:
        return [self.profile.question_text(self.llm.tokenizer, q) for q in questions]

    def generate(self, questions: Sequence[str], prefix, has_memory, config: GenerationConfig) -> list[Generation]:
        return self.llm.generate(self.prompts(questions), prefix, has_memory if prefix is not None else None, config)

    def warmup(self) -> None:
        """One tiny compress and answer, so the first user request does not pay for lazy init."""
        q = self.encode_questions(["warm-up"])
        self.generate(["warm-up"], None, None, GenerationConfig(max_new_tokens=1))
        mem = q.memory[:, None, : self.modules.config.slots_read]  # (1, 1, p, d_m)
        self.align(self.aggregate(q.memory, mem, torch.ones(1, 1, dtype=torch.bool)))
