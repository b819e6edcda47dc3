from __future__ import annotations

import json

import pytest

from trainer.data import (
    SyntheticConfig,
    examples,
    load_jsonl,
    load_split,
    synthetic_stream,
    write_jsonl,
)


def test_synthetic_stream_is_deterministic_by_seed():
    a = synthetic_stream(SyntheticConfig(seed=3, num_entities=60))
    b = synthetic_stream(SyntheticConfig(seed=3, num_entities=60))
    c = synthetic_stream(SyntheticConfig(seed=4, num_entities=60))
    assert a == b
    assert a != c


def test_splits_are_entity_disjoint_also_for_a_longer_stream():
    small = synthetic_stream(SyntheticConfig(num_entities=200))
    big = synthetic_stream(SyntheticConfig(num_entities=1000))
    ents = {s: {d["entity"] for d in docs} for s, docs in small.items()}
    assert (not (ents["train"] & ents["valid"]) and not (ents["train"] & ents["test"])
            and not (ents["valid"] & ents["test"]))
    big_test = {d["entity"] for d in big["test"]}
    assert not (ents["train"] & big_test), "a longer test stream must not contain a training entity"
    for docs in small.values():
        assert [d["date"] for d in docs] == sorted(d["date"] for d in docs), "stream order is date order"


def test_answers_are_in_their_document_and_latest_reports_supersede():
    stream = synthetic_stream(SyntheticConfig(num_entities=100, update_prob=1.0))
    latest = 0
    for docs in stream.values():
        by_id = {d["doc_id"]: d for d in docs}
        for e in examples(docs):
            assert e.answers[0] in e.document
            if e.kind == "latest":
                latest += 1
                older = [by_id[r] for r in e.related if by_id[r]["kind"] == by_id[e.doc_id]["kind"]]
                assert older and all(o["date"] <= by_id[e.doc_id]["date"] for o in older)
                assert all(e.answers[0] not in o["text"] for o in older), "the superseded report has another value"
    assert latest > 0


def test_jsonl_roundtrip_and_ready_splits(tmp_path):
    docs = synthetic_stream(SyntheticConfig(num_entities=20))["train"]
    path = write_jsonl(tmp_path / "docs.jsonl.gz", docs)
    assert load_jsonl(path) == docs
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "Some text.", "questions": [{"question": "Q?", "answers": ["A"]}]}) + "\n")
    (loaded,) = load_jsonl(plain)
    assert loaded["doc_id"] and loaded["questions"][0]["qid"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError):
        load_jsonl(bad)
    squad = load_split("squad", "valid", limit=5)
    assert len(squad) == 5 and squad[0]["questions"] and all(q["answers"] for q in squad[0]["questions"])
