"""The frozen LLM: a small backend interface and its HF transformers implementation.

Letters: B batch (B' = 2B for the two passes of memory-aware decoding), n prompt tokens,
p prefix positions, V vocabulary.

The LLM is never trained: every parameter is frozen at load. Memory enters only as a per-request
KV prefix (service.models.prefix). Decoding is a small loop of our own rather than
`model.generate()`, because memory-aware decoding mixes the logits of two rows of one batch,
(1+α)·l(y | M*, q) − α·l(y | q), and streaming needs the tokens step by step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from service.errors import InvalidInputError
from service.models.fingerprint import fingerprint
from service.models.llm_source import resolve_llm
from service.models.prefix import KVLayout, KVPrefix, cache_keyword


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    """Most tokens generated per answer."""
    do_sample: bool = False
    """Greedy when False."""
    temperature: float = 1.0
    """Softmax temperature when sampling (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    alpha: float = 0.0
    """Memory-aware decoding weight α >= 0; 0 = plain decoding with memory."""
    stop_strings: tuple[str, ...] = ()
    """Generation of a row stops at the first of these; the answer excludes it."""
    seed: int | None = None
    """Sampling seed, for reproducible sampled answers."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise InvalidInputError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.alpha >= 0:
            raise InvalidInputError(f"alpha must be >= 0, got {self.alpha}")


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    """"eos", "stop" (a stop string) or "length"."""
    prompt_tokens: int


@dataclass(frozen=True)
class LLMIdentity:
    """Which LLM a checkpoint was trained for."""

    name_or_path: str
    model_type: str
    fingerprint: str


@runtime_checkable
class LLMBackend(Protocol):
    """What serving needs from a frozen LLM: the engine, the ask service and CMTPipeline are typed against
    it (HFCausalLM now; a vLLM backend implements the same). Training needs `HFCausalLM.forward_logits`."""

    layout: KVLayout
    identity: LLMIdentity
    tokenizer: PreTrainedTokenizerBase
    eos_ids: set[int]

    @property
    def device(self) -> torch.device: ...

    def prefix_from_embeddings(self, embeddings: torch.Tensor) -> KVPrefix: ...

    def text_embeddings(self, text: str) -> torch.Tensor: ...

    def generate(
        self,
        prompts: Sequence[str],
        prefix: KVPrefix | None = None,
        prefix_mask: torch.Tensor | None = None,
        config: GenerationConfig = GenerationConfig(),
    ) -> list[Generation]: ...

    def stream(
        self,
        prompts: Sequence[str],
        prefix: KVPrefix | None = None,
        prefix_mask: torch.Tensor | None = None,
        config: GenerationConfig = GenerationConfig(),
    ) -> Iterator[torch.Tensor]: ...


class HFCausalLM:
    """A frozen `AutoModelForCausalLM` with its tokenizer, prompting with a per-request KV prefix."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name_or_path: str | None = None
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        head = model.get_output_embeddings()
        if head is not None:  # see _contiguous_head_input
            head.register_forward_pre_hook(_contiguous_head_input)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:  # left padding needs some id; padded positions are masked
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "left"
        self.layout = KVLayout.from_config(model.config)
        self.cache_arg = cache_keyword(model)
        """The keyword model.forward takes a KV cache by (prefix.cache_keyword: it was renamed in transformers 5.2x)."""
        self._base_cache_arg = cache_keyword(model.base_model)  # read once: prefix_from_embeddings runs per question
        self.identity = LLMIdentity(
            name_or_path=name_or_path or getattr(model.config, "_name_or_path", "") or "unnamed",
            model_type=model.config.model_type,
            fingerprint=fingerprint(model.config, tokenizer),
        )
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        cache_dir: str | Path | None = None,
    ) -> HFCausalLM:
        """Load from a local directory, a hub id (needs the network), a .gguf file or a packaged name
        such as smollm2-135m-instruct; GGUFs are converted once into `cache_dir` (service.models.llm_source)."""
        source = resolve_llm(name_or_path, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
        return cls(model.to(device), tokenizer, str(name_or_path))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input_ids and attention_mask, each (B, n)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise InvalidInputError("prompts must be a non-empty list of non-empty strings")
        enc = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def prefill_inputs(
        self, attention_mask: torch.Tensor, prefix: KVPrefix | None, prefix_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
        """Full mask (B, p+n), prompt positions (B, n) and a fresh cache holding the prefix."""
        B, n = attention_mask.shape
        if prefix is None:
            full_mask = attention_mask
            cache = DynamicCache(config=self.model.config)
        else:
            prefix.check_layout(self.layout)
            if prefix.batch_size != B:
                raise InvalidInputError(f"prefix batch {prefix.batch_size} != prompt batch {B}")
            if prefix_mask is None:
                prefix_mask = torch.ones(B, dtype=torch.bool, device=attention_mask.device)
            prefix_cols = prefix_mask.to(attention_mask.device, attention_mask.dtype)[:, None]  # (B, 1)
            full_mask = torch.cat([prefix_cols.expand(B, prefix.length), attention_mask], dim=1)  # (B, p+n)
            cache = prefix.to_cache(self.model.config, dtype=self.model.dtype)
        if self.layout.max_positions is not None and full_mask.shape[1] > self.layout.max_positions:
            raise InvalidInputError(
                f"prefix + prompt = {full_mask.shape[1]} positions exceed the LLM's {self.layout.max_positions}"
            )
        # Masked prefix rows start at position 0, exactly as if there were no prefix.
        positions = (full_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -n:]  # (B, n)
        return full_mask, positions, cache

    def forward_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: KVPrefix | None = None,
        prefix_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, n, V) of the prompt tokens; gradients flow into the prefix (training)."""
        full_mask, positions, cache = self.prefill_inputs(attention_mask, prefix, prefix_mask)
        out = self.model(
            input_ids=input_ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
            **{self.cache_arg: cache},
        )
        return out.logits

    def prefix_from_embeddings(self, embeddings: torch.Tensor) -> KVPrefix:
        """The LLM's own K/V of p input embeddings (B, p, d_llm) at positions 0..p-1: an "embeddings"
        aligner's prefix. Gradients flow into the embeddings when enabled (training)."""
        B, p, _ = embeddings.shape
        cache = DynamicCache(config=self.model.config)
        positions = torch.arange(p, device=self.device).expand(B, p)  # (B, p)
        self.model.base_model(
            inputs_embeds=embeddings.to(self.model.dtype), position_ids=positions, use_cache=True,
            **{self._base_cache_arg: cache},
        )
        return KVPrefix.from_cache(cache)

    def text_embeddings(self, text: str) -> torch.Tensor:
        """The LLM's input embeddings (n, d_llm) of a text's tokens (no special tokens); (0, d_llm) for ""."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return self.model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=self.device))

    def choose_token(
        self, logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Next token (B,) from logits (B, V)."""
        if not config.do_sample:
            return logits.argmax(dim=-1)
        # Shift the max to 0 first: a tiny temperature (0 in fp32) then sends the others to -inf and
        # the max (0/0 = NaN) back to 0: sampling becomes argmax instead of NaN.
        shifted = logits - logits.max(dim=-1, keepdim=True).values  # (B, V)
        probs = torch.softmax((shifted / config.temperature).nan_to_num(nan=0.0), dim=-1)  # (B, V)
        if config.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > config.top_p  # (B, V)
            probs = probs.scatter(1, order, sorted_probs.masked_fill(outside, 0.0))
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    def stream(
        self,
        prompts: Sequence[str],
        prefix: KVPrefix | None = None,
        prefix_mask: torch.Tensor | None = None,
        config: GenerationConfig = GenerationConfig(),
    ) -> Iterator[torch.Tensor]:
        """Yields the next token of every row, (B,), step by step (the caller decides when to stop)."""
        return self._steps(*self.encode(prompts), prefix, prefix_mask, config)

    @torch.inference_mode()
    def _steps(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: KVPrefix | None,
        prefix_mask: torch.Tensor | None,
        config: GenerationConfig,
    ) -> Iterator[torch.Tensor]:
        """The decode loop over left-padded input_ids, attention_mask (B, n)."""
        B = input_ids.shape[0]
        two_pass = config.alpha > 0 and prefix is not None
        if two_pass:  # rows B..2B-1: the same prompts with the prefix masked out, l(y | q)
            if prefix_mask is None:
                prefix_mask = torch.ones(B, dtype=torch.bool, device=self.device)
            input_ids, attention_mask = input_ids.repeat(2, 1), attention_mask.repeat(2, 1)  # (B', n)
            prefix = prefix.repeat(2)
            prefix_mask = torch.cat([prefix_mask.to(self.device), torch.zeros_like(prefix_mask, device=self.device)])
        full_mask, positions, cache = self.prefill_inputs(attention_mask, prefix, prefix_mask)
        generator = None
        if config.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(config.seed)
        step_ids = input_ids
        for _ in range(config.max_new_tokens):
            logits = self.model(  # logits of the last position only: the prompt's others would cost B'·n·V
                input_ids=step_ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **{self.cache_arg: cache},
            ).logits[:, -1].float()  # (B', V)
            if two_pass:
                logits = (1 + config.alpha) * logits[:B] - config.alpha * logits[B:]  # (B, V)
            token = self.choose_token(logits, config, generator)  # (B,)
            yield token
            step_ids = (token.repeat(2) if two_pass else token)[:, None]  # (B', 1)
            full_mask = torch.cat([full_mask, full_mask.new_ones(full_mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1  # (B', 1)

    def generate(
        self,
        prompts: Sequence[str],
        prefix: KVPrefix | None = None,
        prefix_mask: torch.Tensor | None = None,
        config: GenerationConfig = GenerationConfig(),
    ) -> list[Generation]:
        """Answers for a batch; each row stops at EOS, a stop string or max_new_tokens."""
        input_ids, attention_mask = self.encode(prompts)  # (B, n)
        B = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(B)]
        reasons: list[str | None] = [None] * B
        for token in self._steps(input_ids, attention_mask, prefix, prefix_mask, config):
            for i, t in enumerate(token.tolist()):
                if reasons[i] is not None:
                    continue
                if t in self.eos_ids:
                    reasons[i] = "eos"
                    continue
                tokens[i].append(t)
                if config.stop_strings:
                    _, stopped = cut_at_stop(
                        self.tokenizer.decode(tokens[i], skip_special_tokens=True), config.stop_strings
                    )
                    if stopped:
                        reasons[i] = "stop"
            if all(r is not None for r in reasons):
                break
        prompt_lengths = attention_mask.sum(dim=1).tolist()  # (B,) real prompt tokens
        out = []
        for i in range(B):
            text, _ = cut_at_stop(self.tokenizer.decode(tokens[i], skip_special_tokens=True), config.stop_strings)
            out.append(Generation(text.strip(), tokens[i], reasons[i] or "length", int(prompt_lengths[i])))
        return out


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string it contains, and whether one was found."""
    found = [text.find(s) for s in stop_strings if s in text]
    return (text[: min(found)], True) if found else (text, False)


class TextPieces:
    """Generated tokens → the text each one adds (what a stream sends), cut at the first stop string."""

    def __init__(self, llm: LLMBackend, stop_strings: Sequence[str]) -> None:
        self.llm, self.stop_strings = llm, stop_strings
        self.tokens: list[int] = []
        self.sent = ""

    def add(self, token: int) -> tuple[str, bool]:
        """The new piece of text (may be "") and whether the answer is finished (EOS or a stop string)."""
        if token in self.llm.eos_ids:
            return "", True
        self.tokens.append(token)
        text, stopped = cut_at_stop(self.llm.tokenizer.decode(self.tokens, skip_special_tokens=True), self.stop_strings)
        piece = text[len(self.sent) :] if len(text) > len(self.sent) else ""
        self.sent = max(self.sent, text, key=len)
        return piece, stopped


def _contiguous_head_input(module: torch.nn.Module, args: tuple) -> tuple:
    """The LM head's input made contiguous. With `logits_to_keep=1` HF slices the last position out of the
    hidden states, (B, T, d) → a (B, 1, d) view with the batch stride of T rows; in bf16 on the CPU `F.linear` then
    cannot fold the batch into one matmul and runs a bmm over B copies of the (V, d) weight: a prefill of 32
    questions on a GPT-2-small took 2.9 s instead of 0.19 s (bench/bench_decoder.py), most of it copying the
    vocabulary matrix. A copy of (B, 1, d) costs nothing."""
    return (args[0].contiguous(), *args[1:])

