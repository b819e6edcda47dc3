"""Serving and training give ψ the same recency ranks (one newest-first rule)."""

from __future__ import annotations

from datetime import UTC, datetime

import torch

from service.models.aggregator import Selection, order_newest_first
from service.runtime.ask import hits_newest_first
from service.storage.index_state import SearchHit


def _hit(doc_id: str, score: float, day: int, received_minute: int) -> SearchHit:
    published = datetime(2026, 2, day, tzinfo=UTC)
    received = datetime(2026, 3, 1, 0, received_minute, tzinfo=UTC)
    return SearchHit(doc_id, score, "v1", None, published, received)


def test_same_date_documents_get_the_same_recency_ranks_when_serving_as_in_training():
    # "b" and "c" share a date; "c" scores higher but was received first; "a" is older.
    hits = [_hit("a", 0.9, 1, 5), _hit("b", 0.5, 2, 9), _hit("c", 0.7, 2, 1)]
    served = [h.id for h in hits_newest_first(hits)]

    timestamps = torch.tensor([h.published_at.timestamp() for h in hits], dtype=torch.float64)  # (N,)
    selection = Selection(indices=torch.tensor([[0, 1, 2]]), scores=torch.tensor([[h.score for h in hits]]))
    trained = [hits[i].id for i in order_newest_first(selection, timestamps).indices[0].tolist()]

    assert served == trained == ["c", "b", "a"]


def test_order_newest_first_puts_same_time_ties_by_score_whatever_the_selection_order():
    selection = Selection(indices=torch.tensor([[1, 0, -1]]), scores=torch.tensor([[0.2, 0.8, float("-inf")]]))
    ordered = order_newest_first(selection, torch.tensor([5.0, 5.0]))
    assert ordered.indices.tolist() == [[0, 1, -1]]
