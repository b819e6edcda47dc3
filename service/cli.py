"""`cmt-serve`: run the service with uvicorn; settings from CMT_* variables and these flags."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from service.app import create_app
from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="CMT memory service")
    parser.add_argument("--host", help="bind address (CMT_HOST)")
    parser.add_argument("--port", type=int, help="port (CMT_PORT)")
    parser.add_argument("--llm", help="frozen LLM: local dir or hub id (CMT_LLM)")
    parser.add_argument("--checkpoint", help="checkpoint dir (CMT_CHECKPOINT)")
    parser.add_argument("--redis-url", help="Redis URL; absent = embedded redis-server (CMT_REDIS_URL)")
    parser.add_argument("--data-dir", help="embedded Redis data folder (CMT_DATA_DIR)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"CMT memory service on http://{settings.host}:{settings.port}  (API docs at /docs)")
    print(f"  ingest: curl -X POST http://{settings.host}:{settings.port}/documents -H 'content-type: application/json' "
          "-d '{\"documents\": [{\"text\": \"...\"}]}'")
    print(f"  ask:    curl -X POST http://{settings.host}:{settings.port}/ask -H 'content-type: application/json' "
          "-d '{\"question\": \"...\"}'")
    # One worker per process: the models live in this process (see README for scaling out).
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
