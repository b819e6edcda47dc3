"""Everything the app holds while it runs, opened by the lifespan and closed in reverse."""

from __future__ import annotations

from dataclasses import dataclass

from service.metrics import Metrics
from service.runtime.ask import AskItem, AskResult, AskService
from service.runtime.batcher import MicroBatcher
from service.runtime.engine import Engine
from service.runtime.ingest import IngestService
from service.settings import Settings
from service.storage.embedded import EmbeddedRedis
from service.storage.redis_store import RedisMemoryStore
from service.storage.sync import SyncedIndex


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    engine: Engine
    store: RedisMemoryStore
    index: SyncedIndex
    ingest: IngestService
    ask: AskService
    ask_batcher: MicroBatcher[AskItem, AskResult]
    embedded: EmbeddedRedis | None
