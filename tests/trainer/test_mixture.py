"""Several training sources mixed by weight: shares, determinism, unique ids, the ready real-data names."""

from __future__ import annotations

from collections import Counter

import pytest

from trainer.data import DATASETS, load_source
from trainer.mixture import Mixture, Part, parse_mixture, shares

SPEC = "synthetic:80=0.75,synthetic-demo:80=0.25"  # both streams name their documents syn0-train-000000...


def test_parse_mixture_syntax():
    assert parse_mixture("synthetic:3000") == [Part("synthetic:3000", 1.0)]
    assert parse_mixture("squad-train=0.7, qed=0.2,archivalqa=0.1") == [
        Part("squad-train", pytest.approx(0.7)), Part("qed", pytest.approx(0.2)),
        Part("archivalqa", pytest.approx(0.1))]
    assert parse_mixture("synthetic:3000=3,squad=1") == [  # normalised
        Part("synthetic:3000", 0.75), Part("squad", 0.25)]
    for bad in ("squad=0.5,qed", "squad=-1,qed=1", "squad=x,qed=1", "squad=1,squad=2", "=1,qed=1", "",
                "squad=nan,qed=1"):
        with pytest.raises(ValueError):
            parse_mixture(bad)


def test_shares_sum_exactly_and_follow_the_weights():
    assert shares(10, [0.7, 0.2, 0.1]) == [7, 2, 1]
    assert shares(7, [1, 1, 1]) == [3, 2, 2]
    assert sum(shares(12345, [0.33, 0.33, 0.34])) == 12345


def test_mixed_sources_keep_unique_ids_and_get_their_weight_of_each_epoch():
    mix = Mixture.load(SPEC, "train", seed=0)
    plain = {s: load_source(s, "train") for s in ("synthetic:80", "synthetic-demo:80")}
    assert {d["doc_id"] for d in plain["synthetic:80"]} & {d["doc_id"] for d in plain["synthetic-demo:80"]}, \
        "ids collide before prefixing"
    ids = [d["doc_id"] for d in mix.documents]
    assert len(ids) == len(set(ids)) and all(i.startswith(("synthetic:80/", "synthetic-demo:80/")) for i in ids)
    qids = [e.qid for exs in mix.examples.values() for e in exs]
    assert len(qids) == len(set(qids))
    known = set(ids)
    # hard distractors still resolve
    assert all(r in known for exs in mix.examples.values() for e in exs for r in e.related)

    n = {s: len(e) for s, e in mix.examples.items()}
    size = 1000
    for epoch in range(3):
        drawn = mix.epoch(epoch, seed=0, size=size)
        assert len(drawn) == size
        by_source = Counter(e.doc_id.split("/")[0] for e in drawn)
        assert abs(by_source["synthetic:80"] - 750) <= 1 and abs(by_source["synthetic-demo:80"] - 250) <= 1
    # default epoch size: as many questions as the sources hold together
    assert len(mix.epoch(0, seed=0)) == sum(n.values())


def test_mixture_epochs_are_deterministic_by_seed_and_use_every_question_before_repeating():
    mix = Mixture.load(SPEC, "train", seed=0)
    a = [e.qid for e in mix.epoch(1, seed=5, size=300)]
    assert a == [e.qid for e in Mixture.load(SPEC, "train", seed=0).epoch(1, seed=5, size=300)]
    assert a != [e.qid for e in mix.epoch(1, seed=6, size=300)]
    assert a != [e.qid for e in mix.epoch(2, seed=5, size=300)]
    source, exs = "synthetic-demo:80", mix.examples["synthetic-demo:80"]
    per_epoch = shares(300, [p.weight for p in mix.parts])[1]
    stream = [e.qid for ep in range(6) for e in mix.epoch(ep, seed=5, size=300) if e.qid.startswith(source)]
    assert len(stream) == 6 * per_epoch
    first_pass = stream[: len(exs)]
    assert sorted(first_pass) == sorted(e.qid for e in exs), "each question once before any repeats"


def test_single_source_is_not_resampled_and_validation_splits_by_weight():
    single = Mixture.load("synthetic:80", "train", seed=0)
    plain = load_source("synthetic:80", "train")
    assert [d["doc_id"] for d in single.documents] == [d["doc_id"] for d in plain]  # ids unchanged
    assert single.epoch(3, seed=1) == single.examples["synthetic:80"]
    valid = Mixture.load(SPEC, "valid", seed=0)
    picked = Counter(e.qid.split("/")[0] for e in valid.first_questions(40))
    assert picked == {"synthetic:80": 30, "synthetic-demo:80": 10}


def test_ready_real_sources_load_by_name():
    assert DATASETS["squad-train"] == "squad_train" and DATASETS["qed"] == "qed"
    mix = Mixture.load("squad-train=0.7,qed=0.2,archivalqa=0.1", "valid", limit=30)
    assert [p["source"] for p in mix.describe()] == ["squad-train", "qed", "archivalqa"]
    assert all(p["documents"] == 30 and p["questions"] >= 30 for p in mix.describe())
    ids = [d["doc_id"] for d in mix.documents]
    assert len(ids) == len(set(ids)) and ids[0].startswith("squad-train/") and ids[-1].startswith("archivalqa/")
    drawn = Counter(e.doc_id.split("/")[0] for e in mix.epoch(0, seed=0, size=200))
    assert drawn == {"squad-train": 140, "qed": 40, "archivalqa": 20}
