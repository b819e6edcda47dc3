"""Re-compress every stored document with a new compressor (a new checkpoint).

Resumable without bookkeeping: documents already at the new version are skipped, so a killed
reindex simply runs again. Each memory is replaced atomically, and only if the document's text is
still the one that was compressed (content-hash check in the script): a concurrent edit wins.
Until the run finishes, serving must pass its own compressor version to the search
(`search(..., compressor_version=v)`) and to `get_memories`, so an old memory is never read with
a question encoded by the new compressor; `store.stale_count(v)` tells how many remain.

Usage from code::

    stats = reindex(store, compress, "ckpt-2024-06-01")

``compress(texts) -> (memories (B, k, d_m), keys (B, d_k))``. The console command is
`cmt-reindex` (`service.cli.reindex_main`): the configured checkpoint's Θ and its version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from service.errors import InvalidInputError
from service.storage.base import MemoryStore
from service.storage.codec import Memory

log = logging.getLogger(__name__)

CompressFn = Callable[[list[str]], tuple[torch.Tensor | Sequence[Memory], torch.Tensor]]
"""texts → their memories ((B, k, d_m), or one stored memory each: codec.Memory) and keys (B, d_k)."""


@dataclass
class ReindexStats:
    total: int = 0  # documents seen
    updated: int = 0
    skipped: int = 0  # already at the new version
    gone: int = 0  # deleted while the reindex ran
    changed: int = 0  # text edited while the reindex ran (its own put stored a fresh memory)


def reindex(
    store: MemoryStore,
    compress: CompressFn,
    compressor_version: str,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> ReindexStats:
    """Re-compress every document not yet at `compressor_version`; returns counts."""
    if batch_size <= 0:
        raise InvalidInputError("batch_size must be positive")
    stats = ReindexStats()
    bar = tqdm(total=store.stale_count(compressor_version), unit="doc", desc="reindex", disable=not progress)
    try:
        for ids in store.iter_ids(max(batch_size, 256)):
            for start in range(0, len(ids), batch_size):
                _reindex_batch(store, compress, compressor_version, ids[start : start + batch_size], stats, bar)
    finally:
        bar.close()
    log.info("reindex to %s: %s", compressor_version, stats)
    return stats


def _reindex_batch(
    store: MemoryStore,
    compress: CompressFn,
    version: str,
    ids: Sequence[str],
    stats: ReindexStats,
    bar: tqdm,
) -> None:
    rows = store.get_docs_meta(ids, ["cv", "hash", "text"])
    todo = [(i, h, t) for i, (cv, h, t) in zip(ids, rows, strict=True) if cv is not None and cv != version]
    stats.total += len(ids)
    stats.skipped += sum(1 for cv, _, _ in rows if cv == version)
    stats.gone += sum(1 for cv, _, _ in rows if cv is None)
    if not todo:
        return
    memories, keys = compress([t for _, _, t in todo])  # (B, k, d_m) or B stored memories, (B, d_k)
    if len(memories) != len(todo) or keys.shape[0] != len(todo):
        raise InvalidInputError(
            f"compress() returned {len(memories)} memories and keys {tuple(keys.shape)} for {len(todo)} texts; "
            "expected one memory and one key per text"
        )
    items = [(i, h, memories[j], keys[j]) for j, (i, h, _) in enumerate(todo)]  # (k, d_m), (d_k,)
    for st in store.update_memories(items, version):
        setattr(stats, st, getattr(stats, st) + 1)
    bar.update(len(todo))
