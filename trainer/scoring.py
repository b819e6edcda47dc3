"""Official SQuAD v1.1 scoring (EM, F1) and, separately labelled, the papers' prefix-EM."""

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


def score(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """EM, F1 (max over golds) and prefix-EM of one prediction, each in [0, 1]."""
    if not golds:
        raise ValueError("a question needs at least one gold answer")
    return {
        "em": max(exact_match(prediction, g) for g in golds),
        "f1": max(f1_score(prediction, g) for g in golds),
        "prefix_em": prefix_exact_match(prediction, golds),
    }


def aggregate(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """100 × the mean of each metric over questions (0 for an empty set)."""
    if len(predictions) != len(golds):
        raise ValueError("as many predictions as gold answer lists are needed")
    if not predictions:
        return {"em": 0.0, "f1": 0.0, "prefix_em": 0.0, "n": 0}
    rows = [score(p, g) for p, g in zip(predictions, golds)]
    out = {k: 100.0 * sum(r[k] for r in rows) / len(rows) for k in ("em", "f1", "prefix_em")}
    out["n"] = len(rows)
    return out
