"""On-disk cache of prompt-only predictions (no memory, gold paragraph, RAG rows) for the evaluation.

A prompt-only answer depends on the frozen LLM, the prompt profile, the generation settings and the
exact prompt text, nothing else; the gold-paragraph row of 1,000 SQuAD questions costs ~10 min of
SmolLM2 prefill on 2 CPU cores, so it is computed once. The key hashes all four:

- the LLM: its config/tokenizer fingerprint (the checkpoint's), a digest of a strided sample of every
  weight tensor (two LLMs of one config with other weights differ), its device type and dtype;
- the profile: `PromptProfile.to_dict()` (templates, shots, chat, stop strings);
- the generation settings (`GenerationConfig`, greedy);
- the prompt text as the LLM reads it.

Each entry also keeps the prompt length in tokens and the measured seconds per question of the
batch that computed it, so a cached row still reports its measured cost. Entries live in one
sqlite file (`predictions.sqlite`) under the cache directory; `hits` and `misses` count lookups.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from service.models.llm import GenerationConfig, HFCausalLM
from service.models.prompts import PromptProfile

DEFAULT_CACHE_DIR = Path("~/.cache/cmt/eval")
SAMPLES_PER_TENSOR = 4096


@dataclass(frozen=True)
class CachedPrediction:
    text: str
    prompt_tokens: int
    seconds: float
    """Wall seconds per question of the batch that computed it."""


@torch.inference_mode()
def llm_weights_digest(llm: HFCausalLM) -> str:
    """sha256 over every parameter's name, shape, dtype and a strided sample of its values."""
    h = hashlib.sha256()
    for name, p in llm.model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)].float().cpu().contiguous()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def llm_cache_identity(llm: HFCausalLM) -> dict[str, str]:
    """What of the LLM decides its predictions: config/tokenizer fingerprint, weights, device type, dtype."""
    return {"fingerprint": llm.identity.fingerprint, "weights": llm_weights_digest(llm), "device": llm.device.type,
            "dtype": str(llm.model.dtype)}


class PredictionCache:
    """prompt → prediction for one (LLM, profile, generation settings); `directory` None = in memory only.
    The prompts looked up must be built with `profile`; they are answered with `generation`.

    Several caches (other profiles, other LLMs) share one sqlite file: the namespace is part of the key."""

    def __init__(self, directory: str | Path | None, llm: HFCausalLM, profile: PromptProfile,
                 generation: GenerationConfig, llm_identity: dict[str, str] | None = None) -> None:
        self.directory = None if directory is None else Path(directory).expanduser()
        self.profile, self.generation = profile, generation
        self.llm_identity = llm_identity if llm_identity is not None else llm_cache_identity(llm)
        self.namespace = json.dumps({"llm": self.llm_identity, "profile": profile.to_dict(),
                                     "generation": dataclasses.asdict(generation)}, sort_keys=True)
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, CachedPrediction] = {}
        self._db: sqlite3.Connection | None = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.directory / "predictions.sqlite")
            self._db.execute("CREATE TABLE IF NOT EXISTS predictions (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                             "prompt_tokens INTEGER NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL)")
            self._db.commit()

    def key(self, prompt: str) -> str:
        return hashlib.sha256((self.namespace + "\0" + prompt).encode()).hexdigest()

    def get(self, prompt: str) -> CachedPrediction | None:
        """The stored prediction (counted as a hit) or None (counted as a miss)."""
        k = self.key(prompt)
        found = self._memory.get(k)
        if found is None and self._db is not None:
            row = self._db.execute(
                "SELECT text, prompt_tokens, seconds FROM predictions WHERE key = ?", (k,)
            ).fetchone()
            if row is not None:
                found = self._memory[k] = CachedPrediction(row[0], int(row[1]), float(row[2]))
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put_many(self, items: dict[str, CachedPrediction]) -> None:
        """Store prompt → prediction pairs (one transaction)."""
        rows = {self.key(p): v for p, v in items.items()}
        self._memory.update(rows)
        if self._db is not None:
            now = time.time()
            self._db.executemany("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?, ?)",
                                 [(k, v.text, v.prompt_tokens, v.seconds, now) for k, v in rows.items()])
            self._db.commit()

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
