"""The per-layer key/value prefix that carries memory into a frozen HF decoder.

Letters: B batch, p prefix positions, H_kv key/value heads, hd head width, n prompt tokens.

Facts this relies on (docs/DESIGN.md §3): a fresh `DynamicCache` per request filled layer by layer;
`attention_mask` must cover p + n positions, ones over the prefix (zeros switch the prefix off
for a row exactly); keys in the cache count as already rotated; prompt positions start at p.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from service.errors import InvalidInputError


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword a HF model's forward takes its KV cache by: `cache` in recent transformers, where
    `past_key_values` is a deprecated alias due to go in 5.40 (and warns on every process's first use);
    `past_key_values` in older ones (the pins allow 5.17, the GPU machine's). Every forward that carries a cache
    passes it by this name, so neither version's deprecation nor its removal changes what the model reads."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@dataclass(frozen=True)
class KVLayout:
    """What shape a prefix must have for one LLM."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None
    """Position budget (GPT-2's absolute positions: the prefix uses p of them)."""
    hidden_size: int | None = None
    """Width of the LLM's input embeddings (what an "embeddings" aligner produces)."""

    @classmethod
    def from_config(cls, config: Any) -> KVLayout:
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_positions=getattr(config, "max_position_embeddings", None),
            hidden_size=config.hidden_size,
        )

    @property
    def values_per_position(self) -> int:
        """Numbers a prefix position adds across all layers, keys and values."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim


@dataclass
class KVPrefix:
    """keys[l], values[l]: (B, H_kv, p, hd) for every attention layer l."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise InvalidInputError("a KV prefix needs one key and one value per layer")
        shape = self.keys[0].shape
        for k, v in zip(self.keys, self.values, strict=True):
            if k.ndim != 4 or k.shape != shape or v.shape != shape:
                raise InvalidInputError(
                    f"every prefix key/value must be (B, H_kv, p, hd) of one shape, got "
                    f"{tuple(k.shape)} / {tuple(v.shape)} against {tuple(shape)}"
                )

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def check_layout(self, layout: KVLayout) -> None:
        _, H_kv, _, hd = self.keys[0].shape
        if (len(self.keys), H_kv, hd) != (layout.num_layers, layout.num_kv_heads, layout.head_dim):
            raise InvalidInputError(
                f"prefix has {len(self.keys)} layers × {H_kv} kv heads × {hd} head dim; the LLM needs "
                f"{layout.num_layers} × {layout.num_kv_heads} × {layout.head_dim}"
            )

    def row(self, b: int) -> KVPrefix:
        """Row b alone, as a prefix of batch 1."""
        return KVPrefix([k[b : b + 1] for k in self.keys], [v[b : b + 1] for v in self.values])

    def repeat(self, times: int) -> KVPrefix:
        """Stack the batch `times` over (rows i, B+i, … share a prefix): the α pass pairs."""
        return KVPrefix(
            [k.repeat(times, 1, 1, 1) for k in self.keys], [v.repeat(times, 1, 1, 1) for v in self.values]
        )

    def to_cache(self, config: Any, dtype: torch.dtype | None = None) -> DynamicCache:
        """A fresh cache for one forward/generate; the prefix tensors keep their autograd graph.

        A plain `DynamicLayer` takes the tensors as they are: its update appends with `torch.cat`, a new tensor,
        so they are never written to, and `cache.update` would copy the whole prefix once more (for the
        continuous decoder, whose whole running cache passes through here each token step, a copy of it all)."""
        cache = DynamicCache(config=config)
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if dtype is not None:
                k, v = k.to(dtype), v.to(dtype)
            cache.update(k[:, :, :0], v[:, :, :0], layer)  # the layer of the model's kind, initialised, no copy
            if type(cache.layers[layer]) is DynamicLayer:
                cache.layers[layer].keys, cache.layers[layer].values = k, v
            else:  # other layer kinds (sliding windows, offloading) keep their own bookkeeping
                cache.update(k, v, layer)
        return cache

    @classmethod
    def from_cache(cls, cache: DynamicCache) -> KVPrefix:
        """An LLM's own KV of a context as a prefix (the exactness reference)."""
        return cls([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])
