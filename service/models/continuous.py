"""Continuous batching for the HF backend: requests join a running decode at the next token step
and leave it the step they finish, each with its own KV prefix, prompt length, stop rule and α.

Letters: R rows in the running batch (a request with α > 0 holds two: with its prefix and with the
prefix masked out, mixed as (1+α)·l(y | M*, q) − α·l(y | q)), H_kv key/value heads, T cached
positions (left-padded: every row's last position is the newest column), hd head width, V vocabulary.

A joining request is prefilled alone (its prefix, its prompt), then its cache is left-padded (or the
batch's is) to one length and concatenated along the batch. Padded columns are masked, and every row
keeps its own position ids, so each row attends to exactly what it would attend to decoded alone.
Synchronous and single-threaded: `ContinuousDecoder.step` is driven by one thread (the service's
decode loop); `add` and `cancel` happen between steps. Where the running cache lives is the store's
business (service.models.kv_slab): grown per step on the CPU, a preallocated slab with CUDA graphs on a GPU.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from service.models.kv_slab import GrowingRows, KVSlab
from service.models.llm import Generation, GenerationConfig, HFCausalLM, cut_at_stop
from service.models.prefix import KVPrefix


@dataclass
class _Request:
    rid: int
    config: GenerationConfig
    rows: int  # 1, or 2 with α (row 0 with the prefix, row 1 without)
    prompt_tokens: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None


@dataclass
class Step:
    """One request's token of one step; `done` is its Generation when this token ended it."""

    rid: int
    token: int
    done: Generation | None = None


class ContinuousDecoder:
    def __init__(self, llm: HFCausalLM, max_rows: int = 64, store: str = "growing", slab_columns: int = 512,
                 cuda_graphs: bool = False) -> None:
        """`store`: "growing" (tensors of exactly the running rows: least arithmetic, the CPU's choice) or
        "slab" (preallocated `slab_columns` columns, grown when needed; with `cuda_graphs` on CUDA each step
        replays a captured graph)."""
        if store not in ("growing", "slab"):
            raise ValueError(f"store must be 'growing' or 'slab', got {store!r}")
        self.llm = llm
        self.max_rows = max_rows
        self._ids = itertools.count()
        self._requests: list[_Request] = []  # in row order
        self._store = GrowingRows(llm) if store == "growing" else KVSlab(llm, max_rows, slab_columns, cuda_graphs)
        self._logits = torch.zeros(0, 0, device=llm.device)  # (R, V) next-token logits of every row

    @property
    def rows(self) -> int:
        return self._store.rows

    @property
    def active(self) -> list[int]:
        return [r.rid for r in self._requests]

    def can_take(self, config: GenerationConfig, has_prefix: bool) -> bool:
        return self.rows + (2 if config.alpha > 0 and has_prefix else 1) <= self.max_rows

    def add(self, prompt: str, prefix: KVPrefix | None = None, config: GenerationConfig = GenerationConfig()) -> int:
        """Prefill one request (prefix of batch 1 or None) and join it; its first token comes with the next step."""
        return self.add_many([(prompt, prefix, config)])[0]

    @torch.inference_mode()
    def add_many(self, requests: list[tuple[str, KVPrefix | None, GenerationConfig]]) -> list[int]:
        """Prefill requests that join at the same step together: one forward per prefix length (a request
        without memory rides along with a masked prefix, exactly as with none). Returns their ids."""
        if not requests:
            return []
        lengths = {p.length for _, p, _ in requests if p is not None}
        groups = {n: [i for i, (_, p, _) in enumerate(requests) if p is not None and p.length == n] for n in lengths}
        bare = [i for i, (_, p, _) in enumerate(requests) if p is None]
        if groups:
            groups[min(groups)] += bare
        else:
            groups[0] = bare
        rids: dict[int, int] = {}
        for members in groups.values():
            rids.update(zip(members, self._prefill([requests[i] for i in members]), strict=True))
        return [rids[i] for i in range(len(requests))]

    def _prefill(self, requests: list[tuple[str, KVPrefix | None, GenerationConfig]]) -> list[int]:
        prompts, prefixes, flags, joined = [], [], [], []
        template = next((p for _, p, _ in requests if p is not None), None)
        for prompt, prefix, config in requests:
            two = config.alpha > 0 and prefix is not None
            prompts += [prompt] * (2 if two else 1)
            if template is not None:  # no memory: the template's shape, masked out
                prefixes += [prefix if prefix is not None else _zeros_like(template)] * (2 if two else 1)
                flags += [True, False] if two else [prefix is not None]
            generator = (
                torch.Generator(device=self.llm.device).manual_seed(config.seed) if config.seed is not None else None
            )
            joined.append(_Request(next(self._ids), config, 2 if two else 1, 0, generator))
        ids, mask = self.llm.encode(prompts)  # (r, n)
        prefix = _stack(prefixes) if template is not None else None
        prefix_mask = torch.tensor(flags, device=self.llm.device) if template is not None else None
        full_mask, positions, cache = self.llm.prefill_inputs(mask, prefix, prefix_mask)
        logits = self.llm.model(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                                logits_to_keep=1, **{self.llm.cache_arg: cache}).logits[:, -1].float()  # (r, V)
        row = 0
        for request in joined:
            request.prompt_tokens = int(mask[row].sum())
            row += request.rows
        self._join(joined, cache, full_mask, positions[:, -1] + 1, logits)
        return [r.rid for r in joined]

    def _join(self, requests: list[_Request], cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor,
              logits: torch.Tensor) -> None:
        keys = [layer.keys for layer in cache.layers]  # (r, H_kv, T', hd)
        values = [layer.values for layer in cache.layers]
        self._store.join(keys, values, mask, next_pos)
        self._logits = torch.cat([self._logits, logits]) if self._requests else logits
        self._requests += requests

    @torch.inference_mode()
    def step(self) -> list[Step]:
        """Every running request's next token (chosen from the logits in hand), then one forward of the
        batch for the requests still running. Finished requests leave before that forward."""
        if not self._requests:
            return []
        out, keep, row = [], [], 0
        for request in self._requests:
            logits = self._logits[row : row + request.rows]  # (rows, V)
            if request.rows == 2:
                logits = (1 + request.config.alpha) * logits[:1] - request.config.alpha * logits[1:]
            token = int(self.llm.choose_token(logits, request.config, request.generator)[0])
            done = self._advance(request, token)
            out.append(Step(request.rid, token, done))
            keep += [not done] * request.rows
            row += request.rows
        self._select(torch.tensor(keep, dtype=torch.bool, device=self.llm.device), [s.done is None for s in out])
        if self._requests:
            self._forward([s.token for s in out if s.done is None])
        return out

    @torch.inference_mode()
    def cancel(self, rid: int) -> None:
        """Drop a request (a client that went away) before the next step."""
        keep_requests = [r.rid != rid for r in self._requests]
        keep_rows = [k for r, k in zip(self._requests, keep_requests, strict=True) for _ in range(r.rows)]
        self._select(torch.tensor(keep_rows, dtype=torch.bool, device=self.llm.device), keep_requests)

    def _advance(self, request: _Request, token: int) -> Generation | None:
        """Append the token; the Generation if it ended the request (EOS, a stop string or the length)."""
        tokenizer, config = self.llm.tokenizer, request.config
        if token in self.llm.eos_ids:
            request.reason = "eos"
        else:
            request.tokens.append(token)
            if config.stop_strings:
                _, stopped = cut_at_stop(
                    tokenizer.decode(request.tokens, skip_special_tokens=True), config.stop_strings
                )
                request.reason = "stop" if stopped else None
            if request.reason is None and len(request.tokens) >= config.max_new_tokens:
                request.reason = "length"
        if request.reason is None:
            return None
        text, _ = cut_at_stop(tokenizer.decode(request.tokens, skip_special_tokens=True), config.stop_strings)
        return Generation(text.strip(), request.tokens, request.reason, request.prompt_tokens)

    def _select(self, rows: torch.Tensor, requests: list[bool]) -> None:
        """Keep the given rows (R,) and requests."""
        if all(requests):  # nobody left: no copy of the cache
            return
        self._requests = [r for r, k in zip(self._requests, requests, strict=True) if k]
        self._logits = self._logits[rows]
        self._store.keep(rows)

    def _forward(self, tokens: list[int]) -> None:
        """One decode step of every running row: logits (R, V) for the next choice."""
        ids = torch.tensor([t for r, t in zip(self._requests, tokens, strict=True) for _ in range(r.rows)],
                           device=self.llm.device)[:, None]  # (R, 1)
        self._logits = self._store.forward(ids)


def _zeros_like(prefix: KVPrefix) -> KVPrefix:
    return KVPrefix([torch.zeros_like(k) for k in prefix.keys], [torch.zeros_like(v) for v in prefix.values])


def _stack(prefixes: list[KVPrefix]) -> KVPrefix:
    """Prefixes of batch 1 and one length → one prefix of their batch."""
    return KVPrefix([torch.cat(ks) for ks in zip(*(p.keys for p in prefixes), strict=True)],
                    [torch.cat(vs) for vs in zip(*(p.values for p in prefixes), strict=True)])
