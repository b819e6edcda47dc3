"""The evaluation's service mode against the real app (tiny models, real Redis). That the service's
answers match the offline evaluation is checked with trained models in test_train_tiny."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.storage.redis_store import RedisMemoryStore
from tests.service.api.conftest import REDIS_URL, make_settings
from trainer.data import SyntheticConfig, examples, synthetic_stream
from trainer.service_eval import ServiceEvalError, evaluate_service

STREAM = SyntheticConfig(seed=3, num_entities=30, kinds=("city",), pool_size=5, fillers=0, distractor_ratio=0.3)


@pytest.fixture
def service(model_dirs):
    settings = make_settings(model_dirs)
    with TestClient(create_app(settings)) as client:
        yield client
    RedisMemoryStore(REDIS_URL, bank=settings.bank).drop_bank()


def test_streaming_reports_ingest_and_latency_and_resending_stores_nothing_new(service):
    docs = synthetic_stream(STREAM)["train"]
    exs = examples(docs)
    row = evaluate_service(service, docs, exs, concurrency=4, max_new_tokens=4)
    assert row["ingest"]["documents"] == len(docs) and row["ingest"]["status"] == {"new": len(docs)}
    assert (row["stored_bytes_per_doc"] > 0 and 0 <= row["em"] <= row["f1"] <= 100
            and len(row["predictions"]) == len(exs))
    assert 0 < row["ask_latency_ms"]["p50"] <= row["ask_latency_ms"]["p95"]
    again = evaluate_service(service, docs, exs[:2], concurrency=1, max_new_tokens=4)
    assert again["ingest"]["status"] == {"unchanged": len(docs)}, \
        "re-streaming the same documents must store nothing new"


def test_a_request_the_service_refuses_is_a_clear_error(service):
    with pytest.raises(ServiceEvalError, match="422"):
        evaluate_service(service, [{"doc_id": "x", "text": " ", "date": None}], [])
