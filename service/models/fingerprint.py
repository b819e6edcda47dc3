"""Identity of a model: a hash of the parts that decide what its hidden states mean.

A checkpoint trained for one LLM is useless (silently wrong) on another, so checkpoints record
this fingerprint and the service refuses a mismatch. Only structural config fields and the
tokenizer's vocabulary are hashed, so the fingerprint stays stable across transformers releases
that add or rename unrelated config defaults.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

_STRUCTURAL_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "max_position_embeddings",
    "rope_theta",
    "tie_word_embeddings",
)


def config_summary(config: Any) -> dict[str, Any]:
    """The structural fields of an HF config (GPT-2's n_layer etc. resolve via its attribute_map)."""
    out: dict[str, Any] = {}
    for name in _STRUCTURAL_FIELDS:
        value = getattr(config, name, None)
        if value is not None:
            out[name] = value
    return out


def tokenizer_summary(tokenizer: Any) -> dict[str, Any]:
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    specials = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
    }
    return {"vocab_size": len(vocab), "vocab_sha256": digest, "special_ids": specials}


def fingerprint(config: Any, tokenizer: Any) -> str:
    """sha256 over the structural config fields and the tokenizer's vocabulary."""
    payload = {"config": config_summary(config), "tokenizer": tokenizer_summary(tokenizer)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
