from __future__ import annotations

import pytest

from trainer.scoring import (
    aggregate,
    f1_score,
    normalize_answer,
    prefix_exact_match,
    score,
)


def test_normalisation_follows_squad_v11():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre", "articles are dropped only as whole words"


@pytest.mark.parametrize(
    "pred, golds, em, f1",
    [
        ("the Denver Broncos", ["Denver Broncos"], 1.0, 1.0),
        ("Denver", ["Denver Broncos"], 0.0, 2 / 3),
        ("Broncos of Denver", ["Denver Broncos", "Broncos"], 0.0, 0.8),
        ("Carolina Panthers", ["Denver Broncos"], 0.0, 0.0),
        ("Santa Clara, California", ["Santa Clara, California", "Levi's Stadium"], 1.0, 1.0),
        ("", ["x"], 0.0, 0.0),
    ],
)
def test_em_and_f1_take_the_max_over_golds(pred, golds, em, f1):
    s = score(pred, golds)
    assert s["em"] == em
    assert s["f1"] == pytest.approx(f1)


def test_prefix_em_is_looser_and_separate():
    assert prefix_exact_match("Denver Broncos won", ["Denver Broncos"]) == 1.0
    assert score("Denver Broncos won", ["Denver Broncos"])["em"] == 0.0
    assert prefix_exact_match("Broncos", ["Denver Broncos", "the Broncos"]) == 1.0  # shortest gold only


def test_aggregate_reports_percentages():
    out = aggregate(["a cat", "dog"], [["cat"], ["bird"]])
    assert out["em"] == 50.0 and out["n"] == 2
    assert f1_score("x b c", "b c d") == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        aggregate(["x"], [])
