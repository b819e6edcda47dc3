"""Prometheus metrics of one app instance (own registry, so several apps in one process do not clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("cmt_http_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.http_duration = Histogram(
            "cmt_http_request_duration_seconds", "HTTP request duration", ["route", "method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ask_stage = Histogram(
            "cmt_ask_stage_duration_seconds", "Duration of each /ask stage per batch", ["stage"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "cmt_batch_size", "Items per model batch", ["batcher"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.batch_duration = Histogram(
            "cmt_batch_duration_seconds", "Model time per batch", ["batcher"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens_generated = Counter("cmt_tokens_generated", "Answer tokens generated", registry=r)
        self.documents = Counter("cmt_ingest_documents", "Documents received by outcome", ["status"], registry=r)
        self.queue_depth = Gauge("cmt_queue_depth", "Items waiting in a batcher", ["batcher"], registry=r)
        self.index_documents = Gauge("cmt_index_documents", "Documents in the top-k index", registry=r)
        self.model_load_seconds = Gauge("cmt_model_load_seconds", "Time to load the models at start", registry=r)
        self.checkpoint = Info("cmt_checkpoint", "Checkpoint being served", registry=r)

    def on_batch(self, batcher: str):
        def record(size: int, seconds: float) -> None:
            self.batch_size.labels(batcher).observe(size)
            self.batch_duration.labels(batcher).observe(seconds)

        return record
