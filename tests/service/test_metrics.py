"""Metrics: names follow Prometheus conventions, every family is recorded by real traffic, bank
statistics are exact (small bank) or sampled (large), Redis failures are counted, GPU gauges."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.errors import StorageUnavailableError
from service.metrics import Metrics, gpu_memory, read_bank_stats
from service.storage import codec
from service.storage.base import DocumentInput, MemoryWrite
from service.storage.redis_store import RedisMemoryStore
from tests.service.api.conftest import REDIS_URL, make_settings

TEXTS = ["The Varn river rose two metres in Oskel.", "Snow fell on the pass — trains were stopped."]


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, sample: str | None = None, **labels) -> float:
    f = fams[name]
    got = [s.value for s in f.samples if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert got, f"no sample {sample or name} {labels}"
    return sum(got)


@pytest.fixture
def served(model_dirs):
    settings = make_settings(model_dirs)
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app.state.cmt
    RedisMemoryStore(REDIS_URL, bank=settings.bank).drop_bank()


def test_metrics_after_traffic(served):
    client, state = served
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)]
    assert client.post("/documents", json={"documents": docs}).status_code == 200
    assert client.post("/documents", json={"documents": docs}).status_code == 200  # unchanged
    dup = [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]
    assert client.post("/documents", json={"documents": dup}).status_code == 422  # rejected
    assert client.post("/ask", json={"question": "How high did the Varn rise?"}).status_code == 200
    stream = client.post("/ask", json={"question": "Snow?", "stream": True})
    pieces = stream.text.count("event: token")
    assert client.get("/documents/nope").status_code == 404
    assert client.get("/no/such/path").status_code == 404

    fams = families(client.get("/metrics").text)
    for name, f in fams.items():  # naming conventions
        assert name.startswith(("cmt_", "process_")), name
        if f.type == "counter":
            assert any(s.name == name + "_total" for s in f.samples) or not f.samples, name
        if "duration" in name or "latency" in name or "time" in name:
            assert name.endswith("_seconds"), name
        if "memory" in name and f.type == "gauge" and name.startswith("cmt_gpu"):
            assert name.endswith("_bytes"), name

    assert value(fams, "cmt_http_requests", "cmt_http_requests_total", route="/ask", status="200") == 2  # one streamed
    assert value(fams, "cmt_http_requests", "cmt_http_requests_total", route="/documents/{doc_id}", status="404") == 1
    assert value(fams, "cmt_http_requests", "cmt_http_requests_total", route="unmatched", status="404") == 1
    assert value(fams, "cmt_http_request_duration_seconds", "cmt_http_request_duration_seconds_count",
                 route="/documents", method="POST", status="422") == 1
    for stage in ("encode", "retrieve", "fetch", "aggregate", "align", "generate", "queue"):
        assert value(fams, "cmt_ask_stage_duration_seconds", "cmt_ask_stage_duration_seconds_count", stage=stage) == 1
    assert value(fams, "cmt_ask_generated_tokens", "cmt_ask_generated_tokens_total", mode="batch") >= 1
    if pieces:
        assert value(fams, "cmt_ask_time_to_first_token_seconds", "cmt_ask_time_to_first_token_seconds_count") == 1
        assert value(fams, "cmt_ask_generated_tokens", "cmt_ask_generated_tokens_total", mode="stream") == pieces

    assert value(fams, "cmt_ingest_documents_received", "cmt_ingest_documents_received_total") == 6
    assert value(fams, "cmt_ingest_documents", "cmt_ingest_documents_total", status="new") == 2
    assert value(fams, "cmt_ingest_documents", "cmt_ingest_documents_total", status="unchanged") == 2
    assert value(fams, "cmt_ingest_documents", "cmt_ingest_documents_total", status="rejected") == 2
    assert value(fams, "cmt_batch_size", "cmt_batch_size_sum", batcher="ingest") == 2
    assert value(fams, "cmt_batch_duration_seconds", "cmt_batch_duration_seconds_count", batcher="ask") >= 1
    assert value(fams, "cmt_queue_depth", batcher="ingest") == 0

    for op in ("put_many", "get_memories", "get_docs_meta"):
        assert value(fams, "cmt_redis_operation_duration_seconds", "cmt_redis_operation_duration_seconds_count", op=op) >= 1
    assert "read_events" not in {s.labels.get("op") for s in fams["cmt_redis_operation_duration_seconds"].samples}

    engine = state.engine
    cv = engine.compressor_version
    size = codec.encoded_size(engine.num_memory_tokens, engine.modules.config.compressor.memory_dim, cv)
    assert value(fams, "cmt_bank_documents") == 2
    assert value(fams, "cmt_index_documents") == 2
    assert value(fams, "cmt_bank_memories", compressor_version=cv) == 2
    assert value(fams, "cmt_bank_memory_bytes") == 2 * size
    assert value(fams, "cmt_bank_text_bytes") == sum(len(t.encode()) for t in TEXTS)
    assert value(fams, "cmt_index_kind", kind="exact") == 1 and value(fams, "cmt_index_kind", kind="hnsw") == 0
    assert value(fams, "cmt_index_stale_documents") == 0
    assert value(fams, "cmt_model_load_seconds") > 0
    info = fams["cmt_checkpoint_info"].samples[0]
    assert info.name == "cmt_checkpoint_info" and info.labels["compressor_version"] == cv
    assert info.labels["device"] == "cpu"
    # GPU gauges are declared (so dashboards' names resolve) but have no sample on the CPU.
    for name in ("cmt_gpu_memory_allocated_bytes", "cmt_gpu_memory_reserved_bytes"):
        assert name in fams and not fams[name].samples
    assert value(fams, "process_resident_memory_bytes") > 0
    assert value(fams, "cmt_http_requests_in_flight") == 1  # the scrape itself


def test_bank_stats_cached_between_scrapes(served):
    client, state = served
    client.get("/metrics")
    docs = [{"id": "late", "text": "arrives after the first scrape"}]
    client.post("/documents", json={"documents": docs})
    fams = families(client.get("/metrics").text)
    assert value(fams, "cmt_index_documents") == 1  # live
    assert value(fams, "cmt_bank_documents") == 0  # cached for bank_stats_ttl_s
    state.metrics.bank_stats_ttl_s = 0
    assert value(families(client.get("/metrics").text), "cmt_bank_documents") == 1


def test_bank_stats_exact_then_sampled():
    store = RedisMemoryStore(REDIS_URL, bank=f"t{uuid.uuid4().hex[:12]}")
    try:
        texts = [("x" * (10 + i)) for i in range(60)]
        writes = [MemoryWrite(DocumentInput(id=f"d{i}", text=t), torch.randn(4, 8), torch.randn(8)) for i, t in enumerate(texts)]
        store.put_many(writes, "cv1")
        size = lambda cv: codec.encoded_size(4, 8, cv)
        exact = read_bank_stats(store, size, sample=100)
        assert (exact.documents, exact.text_bytes, exact.text_sampled) == (60, sum(map(len, texts)), 60)
        assert exact.memories_by_version == {"cv1": 60} and exact.memory_bytes == 60 * size("cv1")
        est = read_bank_stats(store, size, sample=20)
        assert est.text_sampled == 20 and abs(est.text_bytes - exact.text_bytes) < 0.35 * exact.text_bytes
    finally:
        store.drop_bank()
        store.close()


def test_redis_errors_counted():
    m = Metrics()
    store = RedisMemoryStore("redis://127.0.0.1:1/0")  # nothing listens on port 1
    m.instrument_store(store)
    with pytest.raises(StorageUnavailableError):
        store.ping()
    fams = families(m.render().decode())
    assert value(fams, "cmt_redis_errors", "cmt_redis_errors_total", op="ping", cause="ConnectionError") == 1
    assert value(fams, "cmt_redis_operation_duration_seconds", "cmt_redis_operation_duration_seconds_count", op="ping") == 1


def test_gpu_memory(monkeypatch):
    assert gpu_memory("cpu") == []

    class Props:
        total_memory = 80 << 30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 1 << 30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 2 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    assert gpu_memory("cuda") == [("cuda:0", 1 << 30, 2 << 30, 80 << 30)]
    assert gpu_memory("cuda:1")[0][0] == "cuda:1"


def test_metrics_of_two_apps_do_not_clash():
    a, b = Metrics(), Metrics()
    a.http_in_flight.inc()
    assert value(families(b.render().decode()), "cmt_http_requests_in_flight") == 0
    json.dumps(list(families(a.render().decode())))
