from __future__ import annotations

import itertools
from datetime import UTC, datetime

import numpy as np
import pytest
from pydantic import ValidationError

from service.errors import InvalidInputError
from service.storage.base import IndexEntry, SearchFilters
from service.storage.index import VectorIndex

from .helpers import T0, clustered_keys, published


def entries(keys: np.ndarray, *, prefix: str = "d", cv: str = "v1") -> list[IndexEntry]:
    return [
        IndexEntry(id=f"{prefix}{i}", key=keys[i], compressor_version=cv, source=f"src{i % 10}",
                   published_at=published(i % 1000), received_at=T0)
        for i in range(len(keys))
    ]


def recall(a: list[list[str]], b: list[list[str]]) -> float:
    return float(np.mean([len(set(x) & set(y)) / max(len(y), 1) for x, y in zip(a, b, strict=True)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    keys = clustered_keys(12_100, seed=1)  # (12100, 384)
    return keys[:12_000], keys[12_000:]  # bank (12000, 384), queries (100, 384)


@pytest.fixture(scope="module")
def approx(data: tuple[np.ndarray, np.ndarray]) -> VectorIndex:
    idx = VectorIndex(approx_threshold=1_000, auto_maintain=False)
    idx.upsert(entries(data[0]))
    idx.maintain(wait=True)
    assert idx.is_approximate
    return idx


def test_empty_index_and_nonpositive_k() -> None:
    idx = VectorIndex()
    assert idx.search(np.ones(8, np.float32), 5) == []
    idx.upsert(entries(np.eye(8, dtype=np.float32)))
    assert idx.search(np.ones(8, np.float32), 0) == []


def test_exact_top1_is_self_and_k_larger_than_size() -> None:
    keys = clustered_keys(50, d=16, seed=2)
    idx = VectorIndex()
    idx.upsert(entries(keys))
    hits = idx.search(keys[7], 1000)
    assert len(hits) == 50 and hits[0].id == "d7" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    with pytest.raises(InvalidInputError):
        idx.search(np.ones(15, np.float32), 3)
    with pytest.raises(InvalidInputError):
        idx.search(np.zeros(16, np.float32), 3)


def test_approximate_agrees_with_exact(approx: VectorIndex, data: tuple[np.ndarray, np.ndarray]) -> None:
    _, queries = data
    exact = [[h.id for h in approx.search(q, 10, approximate=False)] for q in queries]
    ann = [[h.id for h in approx.search(q, 10)] for q in queries]
    assert recall(ann, exact) >= 0.95
    # brute-force cross-check of the exact path
    bank = data[0]
    truth = [[f"d{j}" for j in np.argsort(-(bank @ q))[:10]] for q in queries[:10]]
    assert recall(exact[:10], truth) == 1.0


def test_filters_return_topk_among_matches(approx: VectorIndex, data: tuple[np.ndarray, np.ndarray]) -> None:
    bank, queries = data
    src = np.array([i % 10 for i in range(len(bank))])
    pub_h = np.array([i % 1000 for i in range(len(bank))])
    lo, hi = datetime(2024, 2, 5, tzinfo=UTC), datetime(2024, 2, 6, tzinfo=UTC)  # hours 96..119
    cases = [
        (SearchFilters(source=("src3",)), src == 3),  # 10%: graph search with a selector
        (SearchFilters(source=("src3", "src4", "src5", "src6")), np.isin(src, [3, 4, 5, 6])),
        (SearchFilters(published_from=lo, published_to=hi), (pub_h >= 96) & (pub_h < 120)),  # 2.4%: exact fallback
        (SearchFilters(source=("src1",), published_from=lo), (src == 1) & (pub_h >= 96)),
    ]
    for filters, match in cases:
        rows = np.flatnonzero(match)
        got_all = []
        truth_all = []
        for q in queries[:30]:
            hits = approx.search(q, 10, filters)
            assert len(hits) == 10
            assert all(match[int(h.id[1:])] for h in hits), filters
            got_all.append([h.id for h in hits])
            truth_all.append([f"d{rows[j]}" for j in np.argsort(-(bank[rows] @ q))[:10]])
        assert recall(got_all, truth_all) >= 0.95, filters
    assert approx.search(queries[0], 5, SearchFilters(source=("nope",))) == []
    assert approx.search(queries[0], 5, compressor_version="v9") == []


def test_deletes_and_updates_with_hnsw(data: tuple[np.ndarray, np.ndarray]) -> None:
    bank, queries = data
    idx = VectorIndex(approx_threshold=1_000, auto_maintain=False, compact_min_dead=10)
    idx.upsert(entries(bank[:3000]))
    idx.maintain(wait=True)
    gone = [f"d{i}" for i in range(0, 3000, 2)]
    idx.remove(gone)
    assert len(idx) == 1500
    for q in queries[:10]:
        assert not {h.id for h in idx.search(q, 10)} & set(gone)
    target = idx.search(queries[0], 1)[0].id
    idx.upsert([IndexEntry(id=target, key=-queries[0], compressor_version="v2", source=None,
                           published_at=None, received_at=T0)])  # move it to the far side
    assert idx.search(queries[0], 1)[0].id != target
    assert idx.search(-queries[0], 1)[0].id == target
    assert idx.version_counts() == {"v1": 1499, "v2": 1}
    assert [h.id for h in idx.search(queries[0], 5, compressor_version="v2")] == [target]
    before = [[h.id for h in idx.search(q, 10, approximate=False)] for q in queries[:20]]
    assert idx.needs_maintenance()
    idx.maintain(wait=True)  # compaction: drop tombstones, rebuild HNSW
    assert idx._state.n == 1500 and idx.is_approximate
    after = [[h.id for h in idx.search(q, 10, approximate=False)] for q in queries[:20]]
    assert after == before


def test_writes_during_maintenance_are_kept(data: tuple[np.ndarray, np.ndarray]) -> None:
    bank, _ = data
    idx = VectorIndex(approx_threshold=1_000, auto_maintain=False)
    idx.upsert(entries(bank[:5000]))
    idx.maintain(wait=False)
    idx.upsert(entries(bank[5000:5100], prefix="late"))
    idx.remove(["d1", "d2"])
    idx.wait_for_maintenance()
    assert idx.is_approximate and len(idx) == 5098
    assert "late3" in idx and "d1" not in idx
    assert idx.search(bank[5003], 1)[0].id == "late3"


def test_search_filters_refuse_naive_dates_and_unknown_fields() -> None:
    with pytest.raises(ValidationError):  # a naive bound is ambiguous; an unknown field is a typo
        SearchFilters(published_from=datetime(2024, 2, 1))
    with pytest.raises(ValidationError):
        SearchFilters(sources=["src3"])


def test_writes_during_a_rebuild_from_the_store_are_kept() -> None:
    keys = clustered_keys(300, d=16, seed=4)
    idx = VectorIndex(approx_threshold=150)
    idx.upsert(entries(keys[:10], prefix="old"))

    def scan():  # the store's scan, while local writes land in the index
        yield entries(keys[:100])
        idx.upsert(entries(keys[200:201], prefix="late"))
        idx.remove(["d5"])
        assert "old3" in idx  # searches still see the entries from before the rebuild
        yield entries(keys[:160])[100:]

    assert idx.rebuild(scan()) == 160
    assert "late0" in idx and "d5" not in idx and "old3" not in idx
    assert len(idx) == 160 and idx.is_approximate  # d0..d159 without d5, with late0; HNSW built before the swap
    assert idx.search(keys[200], 1)[0].id == "late0"


def test_memories_of_a_checkpoint_with_another_key_width_are_stale_rows_no_search_finds() -> None:
    # A bank written by an older checkpoint (576-wide keys) served by one whose keys are 2,048 wide: the
    # index must start, count the old memories as stale for cmt-reindex, and search only the new ones.
    idx = VectorIndex(dim=32)
    old = clustered_keys(20, d=16, seed=3)
    new = clustered_keys(10, d=32, seed=4)
    idx.upsert(entries(old, prefix="old", cv="v-old"))
    idx.upsert(entries(new, prefix="new", cv="v-new"))
    assert idx.dim == 32 and len(idx) == 30 and idx.stale_count("v-new") == 20
    hits = idx.search(new[3], 5, compressor_version="v-new")
    assert hits[0].id == "new3" and all(h.id.startswith("new") for h in hits)
    idx.remove(["old0"])
    assert idx.stale_count("v-new") == 19
