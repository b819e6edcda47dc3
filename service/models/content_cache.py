"""An LRU cache of per-text values keyed by the text's digest, shared by threads (the re-ranker's caches).

Keyed by content, not by document id: an edited text is a new entry, and two ids with one text share one.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from cachetools import LRUCache

V = TypeVar("V")


class ContentCache(Generic[V]):
    def __init__(self, maxsize: int) -> None:
        self._cache: LRUCache[str, V] = LRUCache(maxsize=max(1, maxsize))
        self._lock = threading.Lock()  # the ask batcher's and the warm-up's threads share it

    def get(self, texts: Sequence[str], compute: Callable[[list[str]], list[V]]) -> list[V]:
        """Each text's value: cached, or computed by one call of `compute` on the distinct missing texts."""
        digests = [hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in texts]
        with self._lock:
            found = {d: self._cache[d] for d in digests if d in self._cache}
        missing = {d: t for d, t in zip(digests, texts, strict=True) if d not in found}
        if missing:
            found |= dict(zip(missing, compute(list(missing.values())), strict=True))
            with self._lock:
                for d in missing:
                    self._cache[d] = found[d]
        return [found[d] for d in digests]
