"""Re-compress every stored document with a new compressor (a new checkpoint).

Resumable without bookkeeping: documents already at the new version are skipped, so a killed
reindex simply runs again. Each memory is replaced atomically, and only if the document's text is
still the one that was compressed (content-hash check in the script): a concurrent edit wins.
Until the run finishes, serving must pass its own compressor version to the search
(`search(..., compressor_version=v)`) and to `get_memories`, so an old memory is never read with
a question encoded by the new compressor; `store.stale_count(v)` tells how many remain.

Usage from code::

    stats = reindex(store, compress, "ckpt-2024-06-01")

``compress(texts) -> (memories (B, k, d_m), keys (B, d_m))`` is the primary interface; `main`
wraps it for a console script (``--compressor module:factory``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from service.errors import InvalidInputError
from service.storage.redis_store import RedisMemoryStore

log = logging.getLogger(__name__)

CompressFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ReindexStats:
    total: int = 0  # documents seen
    updated: int = 0
    skipped: int = 0  # already at the new version
    gone: int = 0  # deleted while the reindex ran
    changed: int = 0  # text edited while the reindex ran (its own put stored a fresh memory)


def reindex(
    store: RedisMemoryStore,
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
    store: RedisMemoryStore,
    compress: CompressFn,
    version: str,
    ids: Sequence[str],
    stats: ReindexStats,
    bar: tqdm,
) -> None:
    rows = store.get_docs_meta(ids, ["cv", "hash", "text"])
    todo = [(i, h, t) for i, (cv, h, t) in zip(ids, rows) if cv is not None and cv != version]
    stats.total += len(ids)
    stats.skipped += sum(1 for cv, _, _ in rows if cv == version)
    stats.gone += sum(1 for cv, _, _ in rows if cv is None)
    if not todo:
        return
    memories, keys = compress([t for _, _, t in todo])  # (B, k, d_m), (B, d_m)
    if memories.dim() != 3 or memories.shape[0] != len(todo) or keys.shape[0] != len(todo):
        raise InvalidInputError(
            f"compress() returned memories {tuple(memories.shape)} and keys {tuple(keys.shape)} "
            f"for {len(todo)} texts; expected (B, k, d_m) and (B, d_m)"
        )
    items = [(i, h, memories[j], keys[j]) for j, (i, h, _) in enumerate(todo)]  # (k, d_m), (d_m,)
    for st in store.update_memories(items, version):
        setattr(stats, st, getattr(stats, st) + 1)
    bar.update(len(todo))


def load_compressor(spec: str, checkpoint: str | None) -> CompressFn:
    """`module:attr`: attr is a compress function, or a factory called with the checkpoint path."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise InvalidInputError(f"--compressor must look like package.module:function, got {spec!r}")
    obj = getattr(importlib.import_module(module_name), attr)
    return obj(checkpoint) if checkpoint is not None else obj


def main(argv: Sequence[str] | None = None) -> int:
    from service.storage.factory import StorageConfig, open_store

    p = argparse.ArgumentParser(prog="cmt-reindex", description="Re-compress every stored document.")
    p.add_argument("--compressor", required=True, help="module:function (compress) or module:factory (with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="passed to the factory named by --compressor")
    p.add_argument("--compressor-version", required=True, help="version tag of the new compressor")
    p.add_argument("--redis-url", default=None, help="Redis URL (default: the embedded server in --data-dir)")
    p.add_argument("--data-dir", default="./data", help="data folder of the embedded Redis")
    p.add_argument("--bank", default="default")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    compress = load_compressor(args.compressor, args.checkpoint)
    with open_store(StorageConfig(url=args.redis_url, data_dir=args.data_dir, bank=args.bank)) as store:
        stats = reindex(store, compress, args.compressor_version, batch_size=args.batch_size,
                        progress=not args.no_progress)
        left = store.stale_count(args.compressor_version)
    print(f"reindex done: {stats}; stale documents left: {left}")
    return 0 if left == 0 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
