"""Metrics: names follow Prometheus conventions, every family is recorded by real traffic, bank
statistics are exact (small bank) or sampled (large), Redis failures are counted, GPU gauges."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import service.metrics
from service.app import create_app
from service.errors import StorageUnavailableError
from service.metrics import Metrics, gpu_memory
from service.storage.redis_store import RedisMemoryStore
from tests.service.api.conftest import REDIS_URL, make_settings

TEXTS = ["The Varn river rose two metres in Oskel.", "Snow fell on the pass — trains were stopped."]


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, sample: str | None = None, **labels) -> float:
    f = fams[name]
    got = [s.value for s in f.samples
           if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert got, f"no sample {sample or name} {labels}"
    return sum(got)


def stored_memory_bytes(store: RedisMemoryStore, ids: list[str]) -> int:
    """What Redis holds: STRLEN of each document's stored memory value."""
    r = redis.Redis.from_url(REDIS_URL)
    try:
        return sum(int(r.strlen(store.mem_key(i))) for i in ids)
    finally:
        r.close()


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
        assert value(fams, "cmt_redis_operation_duration_seconds", "cmt_redis_operation_duration_seconds_count",
                     op=op) >= 1
    assert "read_events" not in {s.labels.get("op") for s in fams["cmt_redis_operation_duration_seconds"].samples}

    cv = state.engine.compressor_version
    assert value(fams, "cmt_bank_documents") == 2
    assert value(fams, "cmt_index_documents") == 2
    assert value(fams, "cmt_bank_memories", compressor_version=cv) == 2
    assert value(fams, "cmt_bank_memory_bytes") == stored_memory_bytes(state.store, [d["id"] for d in docs])
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


def test_bank_memory_bytes_gauge_is_what_redis_stores(served):
    # Θ's keys are stored as fp16: the gauge and POST /documents' memory_bytes once counted them
    # as fp32 (2·d_m bytes too many per document). Redis is asked what it holds.
    client, state = served
    docs = [{"id": f"m{i}", "text": f"Report {i}: the Qelmar bridge carried {i} trains."} for i in range(3)]
    new = client.post("/documents", json={"documents": docs}).json()["documents"]
    again = client.post("/documents", json={"documents": docs}).json()["documents"]
    stored = stored_memory_bytes(state.store, [d["id"] for d in docs])
    assert [r["status"] for r in again] == ["unchanged"] * 3
    assert sum(r["memory_bytes"] for r in new) == sum(r["memory_bytes"] for r in again) == stored
    state.metrics.bank_stats_ttl_s = 0
    assert value(families(client.get("/metrics").text), "cmt_bank_memory_bytes") == stored


def test_redis_errors_counted():
    m = Metrics()
    store = RedisMemoryStore("redis://127.0.0.1:1/0", on_operation=m.on_store_operation)  # nothing listens on port 1
    with pytest.raises(StorageUnavailableError):
        store.ping()
    fams = families(m.render().decode())
    assert value(fams, "cmt_redis_errors", "cmt_redis_errors_total", op="ping", cause="ConnectionError") == 1
    assert value(fams, "cmt_redis_operation_duration_seconds", "cmt_redis_operation_duration_seconds_count",
                 op="ping") == 1


def test_blocking_stream_reads_are_counted_not_timed():
    m = Metrics()
    m.on_store_operation("read_events", 0.2, None)
    m.on_store_operation("get", 0.001, None)
    ops = {s.labels["op"] for s in families(m.render().decode())["cmt_redis_operation_duration_seconds"].samples}
    assert ops == {"get"}


def test_metrics_module_knows_the_runtime_only_through_its_interfaces():
    # metrics.py once imported runtime/state.py (which imports metrics.py), read the store's
    # private client and replaced its private error guard.
    tree = ast.parse(Path(service.metrics.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith(("service.runtime", "service.app", "service.api"))]
    private = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
               and not n.attr.startswith("__") and not (isinstance(n.value, ast.Name) and n.value.id == "self")]
    assert private == []


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
