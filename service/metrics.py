"""Prometheus metrics of one app instance (own registry, so several apps in one process do not clash).

Names carry the `cmt_` prefix and base units (seconds, bytes); counters are exposed with
`_total`. Everything the dashboards in `docker/grafana/dashboards/` query is defined here, and
`tests/deploy/test_dashboards.py` fails if a dashboard names a metric this module does not export.

Multi-worker semantics: the service runs **one uvicorn worker per process (one per pod)**: the
models live in the process, so several workers would each load them. Every metric is therefore
per process and exact; Prometheus scrapes each replica (pod) and dashboards aggregate with
`sum` (rates, queue depths) or `max` (bank-wide gauges such as `cmt_bank_documents`, which every
replica reports identically because they read the same Redis bank). prometheus-client's
multiprocess mode is deliberately not used: it cannot express the scrape-time gauges below.

Recorded where they happen:
- HTTP: `cmt_http_requests_total` and `cmt_http_request_duration_seconds` by route template
  (``/documents/{doc_id}``, unmatched paths as ``unmatched``), method and status;
  `cmt_http_requests_in_flight`. A streamed response is timed until its headers are sent.
- /ask: `cmt_ask_stage_duration_seconds{stage}` (encode, retrieve, rerank where the checkpoint re-ranks, fetch,
  aggregate, align, generate, queue), `cmt_ask_generated_tokens_total{mode}` (batch: tokens; stream: text pieces
  sent, one per token that changed the text), `cmt_ask_time_to_first_token_seconds` (streams).
- Batchers: `cmt_batch_size{batcher}` and `cmt_batch_duration_seconds{batcher}` (the ingest
  batcher's duration is the compression time of Θ), `cmt_queue_depth{batcher}`.
- Ingest: `cmt_ingest_documents_received_total`, `cmt_ingest_documents_total{status}` with
  status new | replaced | unchanged (stored or already stored) | rejected (the request failed).
- Redis: `cmt_redis_operation_duration_seconds{op}` and `cmt_redis_errors_total{op,cause}` for
  every store operation, which the store reports to `on_store_operation` (the blocking stream
  read is counted, not timed).

Computed at scrape time (`StateCollector`) from what the lifespan hands to `bind`: queue depths,
index size/kind/stale documents, the bank's documents, memories per compressor version and bytes
(`MemoryStore.bank_stats`, cached `bank_stats_ttl_s`: never a SCAN per scrape), GPU memory when
the models run on CUDA. This module knows the runtime only through those small interfaces.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from service.errors import StorageUnavailableError
from service.storage.base import BLOCKING_OPS, BankStats

log = logging.getLogger(__name__)
# No `*_created` series: in the text format they are extra gauges per label set that no panel uses.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Stages range from ~0.1 ms (retrieve over a small bank) to seconds (generate).
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, *LATENCY_BUCKETS)
# Loopback Redis: GET ≈ 0.1 ms, a 32-memory MGET ≈ 3 ms (docs/DESIGN.md §3).
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ServedModel:
    """What the app serves (`cmt_checkpoint_info`, `cmt_model_load_seconds`)."""

    compressor_version: str
    checkpoint: str
    llm: str
    device: str
    dtype: str
    load_seconds: float


class IndexView(Protocol):
    """What the index gauges read (a `SyncedIndex`)."""

    def __len__(self) -> int: ...

    @property
    def is_approximate(self) -> bool: ...

    def stale_count(self, compressor_version: str) -> int: ...


class QueueView(Protocol):
    """What the queue gauge reads (a `MicroBatcher`)."""

    @property
    def queue_depth(self) -> int: ...


@dataclass(frozen=True)
class _Bound:
    model: ServedModel
    index: IndexView
    queues: Mapping[str, QueueView]
    bank_stats: Callable[[int], BankStats]


class StateCollector:
    """Scrape-time gauges read from the running app's state (bound in the lifespan)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        bound = self.m.bound
        queue = GaugeMetricFamily("cmt_queue_depth", "Items waiting in a batcher's queue", labels=["batcher"])
        index_docs = GaugeMetricFamily("cmt_index_documents", "Live documents in this replica's top-k index")
        index_kind = GaugeMetricFamily(
            "cmt_index_kind", "Top-k index kind (state set: 1 for the kind in use)", labels=["kind"])
        stale = GaugeMetricFamily(
            "cmt_index_stale_documents", "Indexed documents made by another compressor version (await reindex)")
        docs = GaugeMetricFamily("cmt_bank_documents", "Documents stored in the Redis bank")
        mems = GaugeMetricFamily("cmt_bank_memories", "Stored memories by compressor version",
                                 labels=["compressor_version"])
        mem_bytes = GaugeMetricFamily("cmt_bank_memory_bytes", "Bytes of stored memory values (encoded, exact)")
        text_bytes = GaugeMetricFamily(
            "cmt_bank_text_bytes", "Bytes of stored document texts (UTF-8; sampled above cmt_bank_stats sample size)")
        age = GaugeMetricFamily("cmt_bank_stats_age_seconds", "Age of the cached bank statistics")
        gpu_alloc = GaugeMetricFamily("cmt_gpu_memory_allocated_bytes", "GPU memory held by tensors (torch)",
                                      labels=["device"])
        gpu_res = GaugeMetricFamily("cmt_gpu_memory_reserved_bytes", "GPU memory reserved by torch's allocator",
                                    labels=["device"])
        gpu_total = GaugeMetricFamily("cmt_gpu_memory_total_bytes", "GPU memory of the device", labels=["device"])
        if bound is not None:
            for name, batcher in bound.queues.items():
                queue.add_metric([name], batcher.queue_depth)
            index_docs.add_metric([], len(bound.index))
            approx = bound.index.is_approximate
            index_kind.add_metric(["exact"], 0 if approx else 1)
            index_kind.add_metric(["hnsw"], 1 if approx else 0)
            stale.add_metric([], bound.index.stale_count(bound.model.compressor_version))
            stats, at = self.m.bank_stats()
            if stats is not None:
                docs.add_metric([], stats.documents)
                for cv, c in sorted(stats.memories_by_version.items()):
                    mems.add_metric([cv], c)
                mem_bytes.add_metric([], stats.memory_bytes)
                text_bytes.add_metric([], stats.text_bytes)
                age.add_metric([], time.monotonic() - at)
            for device, alloc, reserved, total in gpu_memory(bound.model.device):
                gpu_alloc.add_metric([device], alloc)
                gpu_res.add_metric([device], reserved)
                gpu_total.add_metric([device], total)
        yield from (queue, index_docs, index_kind, stale, docs, mems, mem_bytes, text_bytes, age,
                    gpu_alloc, gpu_res, gpu_total)


def gpu_memory(device: str) -> list[tuple[str, int, int, int]]:
    """(device, allocated, reserved, total) bytes for a CUDA device; [] on CPU or without CUDA."""
    if not device.startswith("cuda"):
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    return [(f"cuda:{index}", int(torch.cuda.memory_allocated(index)), int(torch.cuda.memory_reserved(index)),
             int(total))]


class Metrics:
    def __init__(self, *, bank_stats_ttl_s: float = 15.0, bank_stats_sample: int = 256) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        # ---- HTTP ------------------------------------------------------------------------------
        self.http_requests = Counter("cmt_http_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.http_duration = Histogram(
            "cmt_http_request_duration_seconds", "HTTP request duration (until the response headers for streams)",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.http_in_flight = Gauge("cmt_http_requests_in_flight", "HTTP requests being served", registry=r)
        # ---- /ask ------------------------------------------------------------------------------
        self.ask_stage = Histogram(
            "cmt_ask_stage_duration_seconds", "Duration of each /ask stage (per batch; queue: per request)", ["stage"],
            buckets=STAGE_BUCKETS, registry=r,
        )
        self.tokens_generated = Counter(
            "cmt_ask_generated_tokens", "Answer tokens generated (stream: text pieces sent)", ["mode"], registry=r)
        self.ask_ttft = Histogram(
            "cmt_ask_time_to_first_token_seconds", "Streamed /ask: request to first answer text",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        # ---- batchers --------------------------------------------------------------------------
        self.batch_size = Histogram("cmt_batch_size", "Items per model batch", ["batcher"], buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_duration = Histogram(
            "cmt_batch_duration_seconds", "Model time per batch (ingest: compression by Θ)", ["batcher"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        # ---- ingest ----------------------------------------------------------------------------
        self.ingest_received = Counter("cmt_ingest_documents_received", "Documents received by POST /documents",
                                       registry=r)
        self.documents = Counter(
            "cmt_ingest_documents", "Documents by outcome: new, replaced, unchanged, rejected", ["status"], registry=r)
        # ---- Redis -----------------------------------------------------------------------------
        self.redis_duration = Histogram(
            "cmt_redis_operation_duration_seconds", "Duration of a memory-bank operation on Redis", ["op"],
            buckets=REDIS_BUCKETS, registry=r,
        )
        self.redis_errors = Counter("cmt_redis_errors", "Failed memory-bank operations on Redis", ["op", "cause"],
                                    registry=r)
        self.embedded_redis_restarts = Counter(
            "cmt_embedded_redis_restarts", "Times the embedded redis-server died and was started again from its AOF",
            registry=r)
        # ---- process / models ------------------------------------------------------------------
        self.model_load_seconds = Gauge("cmt_model_load_seconds", "Time to load the models at start", registry=r)
        self.checkpoint = Info("cmt_checkpoint", "Checkpoint and LLM being served", registry=r)
        # ---- scrape time -----------------------------------------------------------------------
        self.bound: _Bound | None = None
        self.bank_stats_ttl_s = bank_stats_ttl_s
        self.bank_stats_sample = bank_stats_sample
        self._bank: tuple[BankStats | None, float] = (None, float("-inf"))
        self._bank_retry_at = float("-inf")
        self._bank_lock = threading.Lock()
        r.register(StateCollector(self))

    # ---- wiring -----------------------------------------------------------------------------------
    def on_batch(self, batcher: str):
        def record(size: int, seconds: float) -> None:
            self.batch_size.labels(batcher).observe(size)
            self.batch_duration.labels(batcher).observe(seconds)

        return record

    def on_answer(self, timings_ms: Mapping[str, float], tokens: int) -> None:
        """QuestionService's observer of an answered question: its stages and queue, its tokens."""
        self.tokens_generated.labels("batch").inc(tokens)
        for stage, ms in timings_ms.items():
            if stage != "total":
                self.ask_stage.labels(stage).observe(ms / 1e3)

    def on_stream_token(self, first_after_s: float | None) -> None:
        """QuestionService's observer of a streamed piece (the first one carries the time to it)."""
        if first_after_s is not None:
            self.ask_ttft.observe(first_after_s)
        self.tokens_generated.labels("stream").inc()

    def on_documents(self, received: int, statuses: Sequence[str] | None) -> None:
        """IngestService's observer of a POST /documents: its size, and each outcome (None = rejected)."""
        self.ingest_received.inc(received)
        if statuses is None:
            self.documents.labels("rejected").inc(received)
        for status in statuses or ():
            self.documents.labels(status).inc()

    def on_store_operation(self, op: str, seconds: float, error: StorageUnavailableError | None) -> None:
        """The store's operation observer (`open_bank(settings, on_operation=...)`)."""
        if error is not None:
            self.redis_errors.labels(op, str((error.details or {}).get("cause", "unknown"))).inc()
        if op not in BLOCKING_OPS:  # a blocking read's time is mostly its wait
            self.redis_duration.labels(op).observe(seconds)

    def bind(
        self,
        model: ServedModel,
        *,
        index: IndexView,
        queues: Mapping[str, QueueView],
        bank_stats: Callable[[int], BankStats],
    ) -> None:
        """Called by the lifespan once the models are loaded and the index is built.

        `queues`: batcher name → batcher; `bank_stats(sample)` reads the bank (Redis) and is cached here.
        """
        self.bound = _Bound(model, index, queues, bank_stats)
        self.model_load_seconds.set(model.load_seconds)
        self.checkpoint.info({
            "compressor_version": model.compressor_version,
            "checkpoint": model.checkpoint,
            "llm": model.llm,
            "device": model.device,
            "dtype": model.dtype,
        })

    def unbind(self) -> None:
        self.bound = None

    # ---- scrape-time reads --------------------------------------------------------------------------
    def bank_stats(self) -> tuple[BankStats | None, float]:
        """Cached bank statistics, refreshed at most every `bank_stats_ttl_s` (last good value on error)."""
        bound = self.bound
        with self._bank_lock:
            stats, at = self._bank
            now = time.monotonic()
            if bound is None or now - at < self.bank_stats_ttl_s or now < self._bank_retry_at:
                return stats, at
            try:
                stats = bound.bank_stats(self.bank_stats_sample)
                at = time.monotonic()
                self._bank = (stats, at)
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail because Redis is down
                self._bank_retry_at = now + self.bank_stats_ttl_s  # last good value until then
                log.warning("bank statistics unavailable: %s", exc)
            return self._bank

    def render(self) -> bytes:
        """The exposition text (blocking: call it off the event loop)."""
        return generate_latest(self.registry)
