"""Official SQuAD v1.1 scoring (EM, F1) and, separately labelled, the papers' prefix-EM, answer
containment and answer length.

EM and F1 punish a right answer said at length (a whole sentence around the right span scores
F1 ~ 0.1): containment ("is the gold answer in there?") and the mean length in words tell a long
right answer from a wrong one. Each is its own number; none is mixed into another.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse white space (SQuAD v1.1)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def prefix_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """The CMT/MAC/CaMeLS "prefix EM": the prediction cut to the length of the single shortest gold
    answer (in normalised characters), compared with it. Looser than EM: report it apart."""
    gold = normalize_answer(min(golds, key=len))
    return float(normalize_answer(prediction)[: len(gold)] == gold)


def contains_answer(prediction: str, gold: str) -> float:
    """1 when the normalised gold occurs in the normalised prediction as whole words ("1889" is in
    "it was built in 1889", "1" is not in "1889"). A gold that normalises to nothing (e.g. "The")
    is contained only in a prediction that normalises to nothing."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if not ref:
        return float(not pred)
    return float(f" {ref} " in f" {pred} ")


def answer_containment(prediction: str, golds: Sequence[str]) -> float:
    """contains_answer, max over the gold answers."""
    return max(contains_answer(prediction, g) for g in golds)


def answer_words(prediction: str) -> int:
    """Length of the prediction in words (white-space separated, as generated, not normalised)."""
    return len(prediction.split())


METRICS = ("em", "f1", "prefix_em", "containment")
"""Per-question scores in [0, 1], reported as 100 x their mean; answer_words is reported as its mean."""


def score(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """EM, F1 (max over golds), prefix-EM and containment of one prediction, each in [0, 1], and
    its length in words."""
    if not golds:
        raise ValueError("a question needs at least one gold answer")
    return {
        "em": max(exact_match(prediction, g) for g in golds),
        "f1": max(f1_score(prediction, g) for g in golds),
        "prefix_em": prefix_exact_match(prediction, golds),
        "containment": answer_containment(prediction, golds),
        "answer_words": float(answer_words(prediction)),
    }


def aggregate(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """100 × the mean of each metric over questions, the mean answer length in words, and n
    (all 0 for an empty set)."""
    if len(predictions) != len(golds):
        raise ValueError("as many predictions as gold answer lists are needed")
    if not predictions:
        return {**{k: 0.0 for k in METRICS}, "answer_words": 0.0, "n": 0}
    rows = [score(p, g) for p, g in zip(predictions, golds, strict=True)]
    out: dict[str, float] = {k: 100.0 * sum(r[k] for r in rows) / len(rows) for k in METRICS}
    out["answer_words"] = sum(r["answer_words"] for r in rows) / len(rows)
    out["n"] = len(rows)
    return out
