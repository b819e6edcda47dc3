"""Everything the app holds while it runs, opened by the lifespan and closed in reverse."""

from __future__ import annotations

from dataclasses import dataclass

from service.metrics import Metrics
from service.runtime.ask import AskItem, AskResult, AskService
from service.runtime.batcher import MicroBatcher
from service.runtime.engine import Engine
from service.runtime.ingest import IngestService
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
