"""Several training sources mixed by weight in one run.

Spec (the trainer's --data and --valid-data): one source as `load_source` names it ("squad-train",
"synthetic:3000", "runs/data/{split}.jsonl"), or a comma-separated list of SOURCE=WEIGHT:

    squad-train=0.7,qed=0.2,archivalqa=0.1

A comma always means a mixture and "=" gives the weight (the last "=" of an item), so a synthetic
source keeps its ":entities" suffix ("synthetic:3000=0.5,squad=0.5"). Weights are positive and
normalised to sum to 1. In a mixture of two or more sources every doc_id, qid and entity is prefixed
with its source ("qed/qed-train-p0001"), so ids stay unique however the sources name theirs.

Sampling: weights set the share of training *questions* drawn from each source per epoch. An epoch
holds `size` questions (default: as many as all sources hold together); source i gives its
largest-remainder share of them, taken from an endless stream of passes over its questions, each pass
a fresh permutation seeded by (seed, source, pass number): epoch e takes the next window of that
stream. So every question of a source is used once before any is used twice (a small source given a
large weight repeats whole passes, a large one is subsampled and continues where the previous epoch
stopped), and an epoch's questions are a function of (seed, epoch) alone: a resumed run draws the same.
A single source without a size is not resampled: each epoch is its questions, each once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from trainer.data import QAExample, examples, load_source

GIVEN = "given"
"""Source name of documents handed in directly (`Mixture.from_docs`)."""


@dataclass(frozen=True)
class Part:
    source: str
    weight: float
    """Share of the epoch's questions (the parts of one mixture sum to 1)."""


def parse_mixture(spec: str) -> list[Part]:
    """Parts of a spec: "SOURCE" (weight 1) or "SOURCE=WEIGHT,SOURCE=WEIGHT,..."."""
    items = [item.strip() for item in spec.split(",")]
    if len(items) == 1 and "=" not in items[0]:
        if not items[0]:
            raise ValueError("empty data source")
        return [Part(items[0], 1.0)]
    parts = []
    for item in items:
        source, eq, raw = item.rpartition("=")
        try:
            weight = float(raw)
        except ValueError:
            weight = math.nan
        if not eq or not source.strip() or not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"mixture item {item!r}: expected SOURCE=WEIGHT with a weight > 0 (spec {spec!r})")
        parts.append(Part(source.strip(), weight))
    names = [p.source for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"a source appears twice in the mixture {spec!r}")
    total = sum(p.weight for p in parts)
    return [Part(p.source, p.weight / total) for p in parts]


def shares(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split by weights, largest remainder first (ties: earlier part); sums to `total` exactly."""
    raw = [total * w / sum(weights) for w in weights]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def stream_window(n: int, start: int, count: int, key: str) -> list[int]:
    """Positions [start, start+count) of the endless stream of shuffled passes over range(n)."""
    out: list[int] = []
    position = start
    while len(out) < count:
        pass_no, offset = divmod(position, n)
        perm = list(range(n))
        random.Random(f"{key}-pass{pass_no}").shuffle(perm)
        take = min(count - len(out), n - offset)
        out += perm[offset : offset + take]
        position += take
    return out


def prefix_ids(source: str, docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of docs whose doc_id, question qids and entity carry "<source>/"."""
    out = []
    for d in docs:
        d = {**d, "doc_id": f"{source}/{d['doc_id']}",
             "questions": [{**q, "qid": f"{source}/{q['qid']}"} for q in d.get("questions", [])]}
        if d.get("entity"):
            d["entity"] = f"{source}/{d['entity']}"
        out.append(d)
    return out


class Mixture:
    """The documents of each source, their questions, and the weights that mix them."""

    def __init__(self, parts: Sequence[Part], docs: dict[str, list[dict[str, Any]]]) -> None:
        self.parts = list(parts)
        self.docs = {p.source: list(docs[p.source]) for p in self.parts}
        self.examples = {p.source: examples(self.docs[p.source]) for p in self.parts}
        ids = [d["doc_id"] for p in self.parts for d in self.docs[p.source]]
        if len(set(ids)) != len(ids):
            raise ValueError("document ids are not unique across the mixture's sources")

    @classmethod
    def load(cls, spec: str, split: str, seed: int = 0, limit: int | None = None) -> Mixture:
        """Each source's `split` (its first `limit` documents); ids prefixed when there are several."""
        parts = parse_mixture(spec)
        docs = {p.source: load_source(p.source, split, seed=seed, limit=limit) for p in parts}
        if len(parts) > 1:
            docs = {s: prefix_ids(s, d) for s, d in docs.items()}
        return cls(parts, docs)

    @classmethod
    def from_docs(cls, docs: Sequence[dict[str, Any]], limit: int | None = None) -> Mixture:
        """One source of documents handed in directly, ids unchanged."""
        return cls([Part(GIVEN, 1.0)], {GIVEN: list(docs)[:limit]})

    @property
    def documents(self) -> list[dict[str, Any]]:
        """Every document, source after source, each source in its own (stream) order."""
        return [d for p in self.parts for d in self.docs[p.source]]

    def num_questions(self) -> int:
        return sum(len(e) for e in self.examples.values())

    def filtered(self, keep: Callable[[dict[str, Any]], bool]) -> tuple[Mixture, int]:
        """The mixture without the documents `keep` refuses (and their questions); how many went."""
        docs = {s: [d for d in ds if keep(d)] for s, ds in self.docs.items()}
        return Mixture(self.parts, docs), sum(map(len, self.docs.values())) - sum(map(len, docs.values()))

    def epoch(self, epoch: int, seed: int, size: int = 0) -> list[QAExample]:
        """The questions of one training epoch, source after source (the batcher shuffles them)."""
        if len(self.parts) == 1 and not size:
            return list(self.examples[self.parts[0].source])
        counts = shares(size or self.num_questions(), [p.weight for p in self.parts])
        out: list[QAExample] = []
        for part, count in zip(self.parts, counts, strict=True):
            exs = self.examples[part.source]
            if count and not exs:
                raise ValueError(f"source {part.source!r} has weight {part.weight:.3f} but no questions")
            out += [exs[i] for i in stream_window(len(exs), epoch * count, count, f"{seed}-{part.source}")]
        return out

    def first_questions(self, n: int) -> list[QAExample]:
        """Validation questions: n split by weight, each source's first ones in stream order."""
        counts = shares(n, [p.weight for p in self.parts])
        return [e for part, count in zip(self.parts, counts, strict=True) for e in self.examples[part.source][:count]]

    def describe(self) -> list[dict[str, Any]]:
        """Per source: weight, documents and questions (for the train log)."""
        return [{"source": p.source, "weight": p.weight, "documents": len(self.docs[p.source]),
                 "questions": len(self.examples[p.source])}
                for p in self.parts]
