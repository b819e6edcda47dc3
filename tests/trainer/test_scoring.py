from __future__ import annotations

import pytest

from trainer.scoring import (
    aggregate,
    answer_containment,
    answer_words,
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


@pytest.mark.parametrize(
    "pred, golds, contained",
    [
        ("It was built in 1889 for the fair.", ["1889"], 1.0),  # long right answer: EM 0, F1 small, contained
        ("The Denver Broncos won the game", ["Denver Broncos"], 1.0),  # normalised on both sides
        ("in 1889", ["1"], 0.0),  # whole words only: "1" is not in "1889"
        ("Carolina Panthers", ["Denver Broncos", "Panthers"], 1.0),  # max over golds
        ("Carolina", ["Denver Broncos"], 0.0),
        ("", ["Denver"], 0.0),
        ("the", ["The"], 1.0),  # a gold that normalises to nothing matches only an empty normalised answer
        ("the end", ["The"], 0.0),
    ],
)
def test_containment_finds_the_normalised_gold_as_whole_words(pred, golds, contained):
    assert answer_containment(pred, golds) == contained
    assert score(pred, golds)["containment"] == contained


def test_a_long_right_answer_is_contained_but_scores_low_f1():
    s = score("The tower was built in 1889 for the World's Fair in Paris.", ["1889"])
    assert s["em"] == 0.0 and s["f1"] < 0.2 and s["containment"] == 1.0
    assert s["answer_words"] == 12


def test_answer_words_counts_generated_words():
    assert answer_words("") == 0
    assert answer_words("  Denver  Broncos ") == 2
    assert answer_words("Santa Clara, California.") == 3


def test_aggregate_reports_containment_and_mean_length_apart():
    out = aggregate(["built in 1889", "dog", ""], [["1889"], ["bird"], ["x"]])
    assert out["containment"] == pytest.approx(100 / 3)
    assert out["em"] == 0.0
    assert out["answer_words"] == pytest.approx((3 + 1 + 0) / 3), "a mean in words, not a percentage"
    assert aggregate([], [])["answer_words"] == 0.0
