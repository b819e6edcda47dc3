"""Checkpoint directory: config.json + one safetensors file per module.

    config.json            format version, CMT config, LLM identity (name, fingerprint, KV layout),
                           backbone identity, compressor version, training metrics
    compressor.safetensors Θ (without the backbone unless it was fine-tuned)
    aggregator.safetensors ψ
    aligner.safetensors    π

The compressor version (a hash of Θ's weights, its config, its backbone and key encoder) tags every
stored memory, so the service can tell memories made by another Θ, or stored another way
(CompressorConfig.stored_picks), from current ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from service.errors import CheckpointError, CheckpointMismatchError
from service.models.cmt import CMTModules
from service.models.compressor import Compressor
from service.models.config import CMTConfig
from service.models.fingerprint import fingerprint
from service.models.llm import LLMIdentity
from service.models.prefix import KVLayout
from service.models.prompts import PromptProfile, get_profile

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODULE_FILES = {
    "compressor": "compressor.safetensors",
    "aggregator": "aggregator.safetensors",
    "aligner": "aligner.safetensors",
}


def _backbone_identity(compressor: Compressor) -> dict[str, str]:
    return {
        "name": compressor.config.backbone,
        "fingerprint": fingerprint(compressor.backbone.config, compressor.tokenizer),
    }


def _key_encoder_identity(compressor: Compressor) -> dict[str, str] | None:
    """The frozen key encoder's name and fingerprint (None without one): part of what a stored key means."""
    encoder = compressor.key_encoder
    if encoder is None:
        return None
    return {"name": compressor.config.key_encoder,
            "fingerprint": fingerprint(encoder.encoder.config, encoder.tokenizer)}


def _state(
    module: torch.nn.Module | dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """CPU copies of a module's tensors; floating ones cast to dtype when given (fp16 for shipping)."""
    state = module if isinstance(module, dict) else module.state_dict()
    cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t  # noqa: E731
    return {name: cast(t.detach().to("cpu")).clone().contiguous() for name, t in state.items()}


def save_checkpoint(
    directory: str | Path, modules: CMTModules, llm: LLMIdentity, metrics: dict[str, Any] | None = None,
    prompt_profile: PromptProfile | None = None, dtype: torch.dtype | None = None,
) -> Path:
    """Write the checkpoint; returns its directory. Files are written then renamed into place.
    The prompt profile (how the LLM was asked in training) is recorded so that serving asks alike.
    dtype (e.g. torch.float16) casts the stored weights; loading casts them back to the modules' fp32."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    states = {
        "compressor": _state(modules.compressor.trainable_state_dict(), dtype),
        "aggregator": _state(modules.aggregator, dtype),
        "aligner": _state(modules.aligner, dtype),
    }
    for name, state in states.items():
        tmp = directory / (MODULE_FILES[name] + ".tmp")
        save_file(state, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
        tmp.replace(directory / MODULE_FILES[name])
    backbone = _backbone_identity(modules.compressor)
    digest = hashlib.sha256((directory / MODULE_FILES["compressor"]).read_bytes())
    digest.update(json.dumps(modules.config.to_dict()["compressor"], sort_keys=True).encode())  # e.g. stored_picks
    digest.update(backbone["fingerprint"].encode())
    key_encoder = _key_encoder_identity(modules.compressor)
    if key_encoder is not None:
        digest.update(key_encoder["fingerprint"].encode())
    config = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "cmt": modules.config.to_dict(),
        "llm": {**asdict(llm), "layout": asdict(modules.aligner.layout)},
        "backbone": backbone,
        **({"key_encoder": key_encoder} if key_encoder is not None else {}),
        "compressor_version": digest.hexdigest()[:16],
        "metrics": metrics or {},
        "prompt_profile": get_profile(prompt_profile).to_dict(),
    }
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    tmp.replace(directory / CONFIG_FILE)
    return directory


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {directory}: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; this service reads {FORMAT_VERSION}")
    return config


def checkpoint_profile(config: dict[str, Any]) -> PromptProfile:
    """The prompt profile a checkpoint was trained with (checkpoints from before profiles: "plain")."""
    return get_profile(config.get("prompt_profile"))


def check_llm(config: dict[str, Any], llm: LLMIdentity, where: str | Path) -> None:
    """Refuse a checkpoint made for another LLM, naming both."""
    made_for = config["llm"]
    if made_for["fingerprint"] != llm.fingerprint:
        raise CheckpointMismatchError(
            f"checkpoint {where} was trained for LLM '{made_for['name_or_path']}' "
            f"({made_for['model_type']}, fingerprint {made_for['fingerprint'][:12]}), but the loaded LLM is "
            f"'{llm.name_or_path}' ({llm.model_type}, fingerprint {llm.fingerprint[:12]}): "
            "load the LLM it was trained for, or train a checkpoint for this one",
            details={"checkpoint_llm": made_for["name_or_path"], "loaded_llm": llm.name_or_path},
        )


def load_checkpoint(
    directory: str | Path, llm: LLMIdentity, layout: KVLayout, device: str | torch.device = "cpu"
) -> tuple[CMTModules, dict[str, Any]]:
    """Modules ready for the given LLM, plus the checkpoint's config (compressor_version, metrics...)."""
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    check_llm(config, llm, directory)
    cmt_config = CMTConfig.from_dict(config["cmt"])
    modules = CMTModules.build(cmt_config, layout)
    backbone = _backbone_identity(modules.compressor)
    if backbone["fingerprint"] != config["backbone"]["fingerprint"]:
        raise CheckpointMismatchError(
            f"checkpoint {directory} was trained on backbone '{config['backbone']['name']}', which differs "
            f"from the backbone found now at '{cmt_config.compressor.backbone}'"
        )
    key_encoder = _key_encoder_identity(modules.compressor)
    if key_encoder is not None and key_encoder["fingerprint"] != config.get("key_encoder", {}).get("fingerprint"):
        raise CheckpointMismatchError(
            f"checkpoint {directory} was trained with key encoder '{cmt_config.compressor.key_encoder}', which "
            "differs from the encoder found now under that name: its stored keys would not match new ones"
        )
    try:
        states = {name: load_file(str(directory / file)) for name, file in MODULE_FILES.items()}
        modules.compressor.load_state_dict(states["compressor"], strict=cmt_config.compressor.train_backbone)
        missing = set(modules.compressor.trainable_state_dict()) - set(states["compressor"])
        if missing:
            raise CheckpointError(f"compressor weights missing from {directory}: {sorted(missing)[:5]}")
        modules.aggregator.load_state_dict(states["aggregator"])
        modules.aligner.load_state_dict(states["aligner"])
    except (OSError, RuntimeError, SafetensorError) as exc:  # unreadable file, or tensors of the wrong names/shapes
        raise CheckpointError(f"cannot load checkpoint {directory}: {exc}") from exc
    return modules.to(device).eval(), config
