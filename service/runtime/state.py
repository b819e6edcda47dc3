"""Everything the app holds while it runs, opened by the lifespan and closed in reverse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.metrics import Metrics
from service.runtime.ask import AskItem, AskResult, AskService
from service.runtime.batcher import MicroBatcher
from service.runtime.engine import Engine
from service.runtime.ingest import IngestService
from service.runtime.questions import QuestionService
from service.settings import Settings
from service.storage.base import MemoryStore
from service.storage.sync import SyncedIndex


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    engine: Engine
    store: MemoryStore  # closing it stops the embedded Redis if this process started one
    index: SyncedIndex
    ingest: IngestService
    ask: AskService
    ask_batcher: MicroBatcher[AskItem, AskResult]
    questions: QuestionService

    async def readiness(self) -> dict[str, Any]:
        """What GET /readyz reports: ready when the models are loaded and Redis answers."""
        cv = self.engine.compressor_version
        # Stale = memories made by another compressor: never served, waiting for `cmt-reindex`.
        checks = {"models": True, "redis": True, "index_documents": len(self.index),
                  "stale_documents": self.index.stale_count(cv)}
        try:
            await run_in_threadpool(self.store.ping)
        except Exception:  # noqa: BLE001 - any failure means not ready
            checks["redis"] = False
        return {"ready": checks["models"] and checks["redis"], "checks": checks, "compressor_version": cv}
