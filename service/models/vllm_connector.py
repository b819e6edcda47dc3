"""The vLLM side of a per-request KV prefix: an out-of-tree KV connector (/work/shared/VLLM.md).

Letters: L layers, p prefix positions, H_kv key/value heads, hd head width, n prompt tokens.

vLLM has no "past_key_values" argument; what it does have is a KV-connector hook meant for
disaggregated prefill, which we use to deliver a learned prefix instead of a remote cache:
  - the request's prompt is p placeholder ids followed by its real ids, and its prefix travels in
    `SamplingParams(extra_args={"kv_transfer_params": {PARAM: payload}})` → `Request.kv_transfer_params`;
  - scheduler side: `get_num_new_matched_tokens` reports the p positions as externally computed, so
    vLLM allocates their slots but never runs the model on the placeholders, and the real prompt gets
    positions p..p+n-1 (as in HF, where prompt positions start at p);
  - worker side: `start_load_kv`, before the forward that prefills the prompt, writes every layer's
    post-RoPE K/V into those slots with the attention backend's own `impl.do_kv_cache_update`, which
    keeps this code free of each backend's cache layout.
The scheduler side only moves bytes it was handed (no Redis, no file, no tensor work): it runs inside
vLLM's scheduling loop. This module imports vLLM at the top: only vLLM loads it, by module path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.models.utils import extract_layer_index

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

PARAM = "cmt_prefix"
"""Key of the prefix payload in `kv_transfer_params`."""


def pack_prefix(keys: list[torch.Tensor], values: list[torch.Tensor]) -> dict[str, Any]:
    """One row's prefix, keys[l]/values[l] (1, H_kv, p, hd), as msgpack-safe bytes + shape + dtype: the
    payload crosses vLLM's front-end → engine-core boundary, which serializes `extra_args` untyped."""
    kv = torch.stack([torch.cat([k, v]) for k, v in zip(keys, values, strict=True)])  # (L, 2, H_kv, p, hd)
    kv = kv.detach().to("cpu").contiguous()
    return {
        "data": kv.view(torch.uint8).numpy().tobytes(),
        "shape": list(kv.shape),
        "dtype": str(kv.dtype).split(".")[1],
        "length": int(kv.shape[3]),
    }


def unpack_prefix(payload: dict[str, Any]) -> torch.Tensor:
    """The payload back as a (L, 2, H_kv, p, hd) tensor on the CPU."""
    raw = torch.frombuffer(bytearray(payload["data"]), dtype=torch.uint8)
    return raw.view(getattr(torch, payload["dtype"])).view(payload["shape"])


@dataclass
class _Load:
    payload: dict[str, Any]
    slots: list[int]
    """Slot id of each prefix position 0..p-1 in vLLM's paged cache."""


@dataclass
class PrefixMetadata(KVConnectorMetadata):
    """What the scheduler hands the workers for one step: the prefixes to write before its forward."""

    loads: list[_Load] = field(default_factory=list)


class PrefixConnector(KVConnectorBase_V1):
    """Writes each request's learned prefix into the slots of its p placeholder positions."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self._dtype = vllm_config.model_config.dtype  # the model's K/V dtype; an fp8 cache quantizes on write
        self._pending: list[_Load] = []  # scheduler side: allocated this step, written at the next forward

    # ---- scheduler side (no I/O: it runs inside vLLM's scheduling loop) -------------------------

    @staticmethod
    def _length(request: Request) -> int:
        params = request.kv_transfer_params or {}
        return int(params[PARAM]["length"]) if PARAM in params else 0

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """The p placeholder positions count as computed (synchronously: loaded at the next forward).
        After a preemption the request starts over at 0 and its prefix is written again."""
        p = self._length(request)
        return (p - num_computed_tokens, False) if p > num_computed_tokens else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        block_ids = blocks.get_block_ids()[0]  # one KV-cache group: every layer is full attention
        p, bs = self._length(request), self._block_size
        slots = [block_ids[i // bs] * bs + i % bs for i in range(p)]
        self._pending.append(_Load(request.kv_transfer_params[PARAM], slots))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta, self._pending = PrefixMetadata(self._pending), []
        return meta

    # ---- worker side ---------------------------------------------------------------------------

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, PrefixMetadata) or not meta.loads:
            return
        layers = {name: layer for name, layer in forward_context.no_compile_layers.items()
                  if getattr(layer, "kv_cache", None) is not None and hasattr(layer, "impl")}
        for load in meta.loads:
            kv = unpack_prefix(load.payload)  # (L, 2, H_kv, p, hd)
            slots = torch.tensor(load.slots, dtype=torch.long)  # (p,)
            for name, layer in layers.items():
                cache = layer.kv_cache
                if isinstance(cache, (list, tuple)):  # releases that keep one cache per virtual engine
                    cache = cache[0]
                if cache.numel() == 0:
                    continue
                key, value = kv[extract_layer_index(name)].to(cache.device)  # (H_kv, p, hd) each
                layer.impl.do_kv_cache_update(  # (p, H_kv, hd) as the attention layer would write them
                    layer, key.transpose(0, 1).to(self._dtype).contiguous(),
                    value.transpose(0, 1).to(self._dtype).contiguous(),
                    cache, slots.to(cache.device),
                )

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

