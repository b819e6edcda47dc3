from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.schemas import AskIn
from service.app import create_app
from service.storage.base import SearchFilters
from service.storage.redis_store import RedisMemoryStore
from tests.service.api.conftest import REDIS_URL, make_settings

DOCS = [
    {"id": "rain", "text": "Zorvath city reported heavy rain on 1 February.", "title": "Rain", "source": "wire",
     "published_at": "2024-02-01T08:00:00Z"},
    {"id": "snow", "text": "Zorvath city reported snow on 2 February.", "title": "Snow", "source": "daily",
     "published_at": "2024-02-02T08:00:00Z"},
    {"text": "The Qelmar bridge opened to traffic in 1931.", "title": "Bridge"},
]


def ingest(client, docs=DOCS):
    r = client.post("/documents", json={"documents": docs})
    assert r.status_code == 200, r.text
    return r.json()["documents"]


def test_ingest_ask_get_list_delete_round_trip(client):
    out = ingest(client)
    assert [d["status"] for d in out] == ["new", "new", "new"]
    assert out[0]["id"] == "rain" and out[2]["id"] and all(d["memory_bytes"] > 0 for d in out)

    r = client.post("/ask", json={"question": "What was the weather in Zorvath?", "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["answer"], str)
    assert {s["id"] for s in body["sources"]} == {d["id"] for d in out}
    assert {"encode", "retrieve", "fetch", "aggregate", "align", "generate", "total"} <= set(body["timings_ms"])

    doc = client.get("/documents/rain").json()
    assert doc["text"] == DOCS[0]["text"] and doc["version"] == 1 and doc["published_at"].startswith("2024-02-01")
    listing = client.get("/documents", params={"limit": 2}).json()
    assert listing["count"] == 3 and len(listing["documents"]) == 2

    assert client.delete("/documents/rain").status_code == 200
    after = client.post("/ask", json={"question": "What was the weather in Zorvath?", "top_k": 3}).json()
    assert "rain" not in {s["id"] for s in after["sources"]}
    assert client.get("/documents/rain").status_code == 404


def test_same_text_is_unchanged_and_new_text_replaces(client):
    first = ingest(client, DOCS[:1])[0]
    again = ingest(client, DOCS[:1])[0]
    assert again["status"] == "unchanged" and again["memory_bytes"] == first["memory_bytes"]
    changed = [{**DOCS[0], "text": "Zorvath city reported a storm on 1 February."}]
    replaced = ingest(client, changed)[0]
    assert replaced["status"] == "replaced" and replaced["version"] == 2
    assert client.get("/documents/rain").json()["text"].endswith("storm on 1 February.")


def test_filters_restrict_sources(client):
    ingest(client)
    r = client.post("/ask", json={"question": "weather?", "top_k": 3, "filters": {"source": ["daily"]}})
    assert [s["id"] for s in r.json()["sources"]] == ["snow"]
    r = client.post("/ask", json={"question": "weather?", "filters": {"published_to": "2024-02-02T00:00:00Z"}})
    assert [s["id"] for s in r.json()["sources"]] == ["rain"]


def test_request_filters_parse_into_the_one_filter_type_the_index_takes():
    body = AskIn.model_validate(
        {"question": "q", "filters": {"source": ["wire"], "published_from": "2024-02-01T00:00:00Z"}}
    )
    assert isinstance(body.filters, SearchFilters) and body.filters.source == ("wire",)
    for bad in ({"source": []}, {"published_from": "2024-02-01T00:00:00"}, {"sources": ["wire"]}):  # naive time, typo
        with pytest.raises(ValidationError):
            AskIn.model_validate({"question": "q", "filters": bad})


def test_empty_bank_answers_without_sources(client):
    r = client.post("/ask", json={"question": "Anything new?"})
    assert r.status_code == 200 and r.json()["sources"] == []


def test_stream_sends_sources_tokens_and_done(client):
    ingest(client)
    with client.stream("POST", "/ask", json={"question": "Weather?", "stream": True, "max_new_tokens": 5}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.split(": ", 1)[1] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "sources" and events[-1] == "done"


def assert_error(r, status: int, code: str):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code and body["error"]["message"]


@pytest.mark.parametrize(
    "payload, status, code",
    [
        ({"documents": []}, 422, "invalid_input"),
        ({"documents": [{"text": ""}]}, 422, "invalid_input"),
        ({"documents": [{"text": "   "}]}, 422, "invalid_input"),
        ({"documents": [{"text": "x", "published_at": "2024-02-01T08:00:00"}]}, 422, "invalid_input"),
        ({"documents": [{"text": "x", "published_at": "0001-01-01T00:00:00+00:05"}]}, 422, "invalid_input"),
        ({"documents": [{"text": "x", "published_at": "9999-12-31T23:59:00-00:05"}]}, 422, "invalid_input"),
        ({"documents": [{"text": "x", "colour": "red"}]}, 422, "invalid_input"),
        ({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, 422, "invalid_input"),
        ({"documents": [{"text": "x" * 5001}]}, 413, "payload_too_large"),
        ({"documents": [{"text": "x"}] * 5}, 413, "payload_too_large"),
        ({"docs": []}, 422, "invalid_input"),
    ],
)
def test_bad_documents_get_clear_errors_and_store_nothing(model_dirs, payload, status, code):
    settings = make_settings(model_dirs, max_text_chars=5000, max_batch_documents=4)
    try:
        with TestClient(create_app(settings)) as client:
            assert_error(client.post("/documents", json=payload), status, code)
            assert client.get("/documents").json()["count"] == 0
    finally:
        RedisMemoryStore(REDIS_URL, bank=settings.bank).drop_bank()


@pytest.mark.parametrize(
    "payload, status, code",
    [
        ({"question": ""}, 422, "invalid_input"),
        ({"question": "   "}, 422, "invalid_input"),
        ({"question": "q", "top_k": 0}, 422, "invalid_input"),
        ({"question": "q", "top_k": 999}, 422, "invalid_input"),
        ({"question": "q", "max_new_tokens": 10_000}, 422, "invalid_input"),
        ({"question": "q", "alpha": -1}, 422, "invalid_input"),
        ({"question": "q" * 3000}, 413, "payload_too_large"),
        ({"question": "q", "filters": {"published_from": "yesterday"}}, 422, "invalid_input"),
        ({"question": "q", "stop": [""]}, 422, "invalid_input"),
        ({"question": "q", "stop": ["a", "b", "c", "d", "e"]}, 422, "invalid_input"),
    ],
)
def test_bad_questions_get_clear_errors(client, payload, status, code):
    assert_error(client.post("/ask", json=payload), status, code)


def test_stop_strings_cut_the_answer_at_their_first_occurrence(client):
    ingest(client)
    ask = {"question": "What was the weather in Zorvath?", "max_new_tokens": 12}
    full = client.post("/ask", json=ask).json()["answer"]
    assert len(full) >= 3, f"need a longer greedy answer to cut: {full!r}"
    stop = full[1:3]
    cut = client.post("/ask", json={**ask, "stop": ["never-generated-xyz", stop]}).json()
    assert cut["answer"] == full[: full.index(stop)]
    assert cut["finish_reason"] == "stop"


def test_unknown_document_is_404_and_malformed_json_is_422(client):
    assert_error(client.get("/documents/nope"), 404, "not_found")
    assert_error(client.delete("/documents/nope"), 404, "not_found")
    r = client.post("/documents", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid_input")


def test_api_keys_guard_writes_and_reads(model_dirs):
    settings = make_settings(model_dirs, api_keys=["w-secret"], read_api_keys=["r-secret"])
    try:
        with TestClient(create_app(settings)) as client:
            doc = {"documents": [{"text": "hello"}]}
            assert_error(client.post("/documents", json=doc), 401, "unauthorized")
            assert_error(client.post("/documents", json=doc, headers={"X-API-Key": "r-secret"}), 401, "unauthorized")
            assert client.get("/documents").json()["error"]["code"] == "unauthorized"
            assert client.post("/documents", json=doc, headers={"Authorization": "Bearer w-secret"}).status_code == 200
            assert client.get("/documents", headers={"X-API-Key": "r-secret"}).json()["count"] == 1
            assert client.get("/healthz").status_code == 200
    finally:
        RedisMemoryStore(REDIS_URL, bank=settings.bank).drop_bank()


def test_health_ready_metrics_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["checks"]["redis"]
    ingest(client, DOCS[:1])
    client.post("/ask", json={"question": "hi"})
    text = client.get("/metrics").text
    assert 'cmt_http_requests_total{method="POST",route="/ask",status="200"}' in text
    assert "cmt_ask_stage_duration_seconds_bucket" in text
    assert json.loads(client.get("/openapi.json").text)["paths"]["/ask"]


def test_ask_defaults_to_the_alpha_the_checkpoint_was_trained_with(model_dirs, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(model_dirs[1], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["metrics"]["alpha"] = 0.7
    (ckpt / "config.json").write_text(json.dumps(config))
    settings = make_settings(model_dirs, checkpoint=ckpt)
    try:
        with TestClient(create_app(settings)) as client:
            ask = client.app.state.cmt.ask
            assert ask.item("q", None, None, None, SearchFilters()).generation.alpha == 0.7
            assert ask.item("q", None, None, 0.0, SearchFilters()).generation.alpha == 0.0
            assert client.post("/ask", json={"question": "Any news?"}).status_code == 200
    finally:
        RedisMemoryStore(REDIS_URL, bank=settings.bank).drop_bank()


def test_recency_margin_lets_a_newer_report_on_the_same_fact_win_over_an_older_closer_match(client):
    docs = [
        {"id": "old", "text": "Varnholt Works employs 120 people.", "published_at": "2024-01-01T00:00:00Z"},
        {"id": "new", "text": "Varnholt Works now has a workforce of 340.", "published_at": "2024-06-01T00:00:00Z"},
        {"id": "other", "text": "The Qelmar bridge opened to traffic in 1931.", "published_at": "2025-01-01T00:00:00Z"},
    ]
    ingest(client, docs)
    ask = {"question": "How many people does Varnholt Works employ?", "top_k": 1, "max_new_tokens": 2}
    by_score = client.post("/ask", json={**ask, "recency_margin": 0.0}).json()["sources"]
    assert [s["id"] for s in by_score] == ["old"], "precondition: the older report is the closer match"
    recent = client.post("/ask", json={**ask, "recency_margin": 0.5}).json()["sources"]
    assert [s["id"] for s in recent] == ["new"] and recent[0]["score"] < by_score[0]["score"]
    bad = client.post("/ask", json={**ask, "recency_margin": -0.1})
    assert bad.status_code == 422 and "recency_margin" in bad.text


def test_continuous_batching_answers_as_the_batch_path_with_and_without_alpha(model_dirs):
    texts = ["The Varn river rose two metres in Oskel.", "Snow fell on the pass above Lumen.",
             "The mayor of Oskel is Ada Brin."]
    docs = {"documents": [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]}
    questions = [{"question": "How high did the Varn rise?", "max_new_tokens": 6},
                 {"question": "Who is the mayor?", "alpha": 0.5, "max_new_tokens": 5},
                 {"question": "Where did snow fall?", "top_k": 2, "max_new_tokens": 3, "stop": ["."]}]
    answers = {}
    for continuous in (False, True):
        settings = make_settings(model_dirs, continuous_batching=continuous)
        try:
            with TestClient(create_app(settings)) as c:
                assert c.post("/documents", json=docs).status_code == 200
                answers[continuous] = [c.post("/ask", json=q).json() for q in questions]
                with c.stream("POST", "/ask", json={**questions[0], "stream": True}) as r:
                    streamed = [line for line in r.iter_lines() if line.startswith("data:")]
        finally:
            RedisMemoryStore(REDIS_URL, bank=settings.bank).drop_bank()
        pieces = "".join(json.loads(line[5:]).get("text", "") for line in streamed)
        assert pieces.strip() == answers[continuous][0]["answer"], "the stream says what the answer says"
    for batch, cont in zip(answers[False], answers[True], strict=True):
        assert cont["answer"] == batch["answer"] and cont["sources"] == batch["sources"]
        assert {"queue", "generate", "total"} <= set(cont["timings_ms"])
