"""Console commands: `cmt-serve` runs the service, `cmt-reindex` re-compresses the stored
documents with the configured checkpoint. Settings come from CMT_* variables and these flags."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from service.settings import Settings


def _quiet_openmp() -> None:
    """Idle OpenMP threads must sleep, not spin: measured here, spinning torch threads made a
    GPT-2-small forward 4-6x slower and index search 15x slower whenever another process (the
    embedded Redis, a second replica, a benchmark client) wanted a core. Must run before torch is
    imported; an explicit OMP_WAIT_POLICY from the environment wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--llm", help="frozen LLM: local dir, hub id, .gguf file or smollm2-135m-instruct (CMT_LLM)")
    parser.add_argument("--checkpoint", help="checkpoint dir (CMT_CHECKPOINT)")
    parser.add_argument("--redis-url", help="Redis URL; absent = embedded redis-server (CMT_REDIS_URL)")
    parser.add_argument("--data-dir", help="folder of the embedded Redis, used without --redis-url (CMT_DATA_DIR)")
    parser.add_argument("--bank", help="memory bank name (CMT_BANK)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Settings(**{k: v for k, v in vars(args).items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    """cmt-serve"""
    _quiet_openmp()
    import uvicorn

    from service.app import create_app

    parser = _parser("CMT memory service")
    parser.add_argument("--host", help="bind address (CMT_HOST)")
    parser.add_argument("--port", type=int, help="port (CMT_PORT)")
    settings = _settings(parser.parse_args(argv))
    base = f"http://{settings.host}:{settings.port}"
    print(f"CMT memory service on {base}  (API docs at {base}/docs)")
    print(f"  ingest: curl -X POST {base}/documents -H 'content-type: application/json' "
          "-d '{\"documents\": [{\"text\": \"...\"}]}'")
    print(f"  ask:    curl -X POST {base}/ask -H 'content-type: application/json' -d '{{\"question\": \"...\"}}'")
    print(f"  try it on real news (another shell): {sys.executable} -m trainer.evaluate --service-url {base} "
          "--data archivalqa --split test --max-questions 50 --out runs/eval-served")
    print("    (streams NYT paragraphs of 2004-2007 through POST /documents, asks their questions, scores the answers)")
    # One worker per process: the models live in this process; scale out with replicas.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=30)


def reindex_main(argv: list[str] | None = None) -> int:
    """cmt-reindex: bring every stored memory to the configured checkpoint's compressor version."""
    _quiet_openmp()
    from service.runtime.engine import Engine
    from service.storage.factory import open_bank
    from service.storage.reindex import reindex

    parser = _parser("Re-compress every stored document with the configured checkpoint (resumable).")
    parser.add_argument("--batch-size", type=int, dest="ingest_batch_size",
                        help="documents compressed together (CMT_INGEST_BATCH_SIZE)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    progress = not args.no_progress
    del args.no_progress
    settings = _settings(args)
    engine = Engine.load(settings)

    def compress(texts: list[str]):
        out = engine.compress(texts)
        return engine.stored_memories(out), out.key  # B × ((k, d_m) fp16 or TokenPicks), (B, d_k)

    with open_bank(settings) as store:  # closing it stops an embedded server this command started
        stats = reindex(store, compress, engine.compressor_version, batch_size=settings.ingest_batch_size,
                        progress=progress)
        left = store.stale_count(engine.compressor_version)
    print(f"reindex to {engine.compressor_version}: {stats}; stale documents left: {left}")
    return 0 if left == 0 else 1


if __name__ == "__main__":
    main()
