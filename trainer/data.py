"""Training and evaluation data: the ready splits of ../shared/data, any JSONL of documents with
questions, and a deterministic synthetic news stream about fictional entities.

Every source yields documents in one schema (that of ../shared/data/README.md):

    {"doc_id", "title", "text", "date", "questions": [{"qid", "question", "answers": [str, ...]}], ...}

Synthetic documents also carry "entity", "kind" and, per question, "kind" ("single": the answer is in
exactly one document; "latest": an earlier report about the same fact exists and the newest wins).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {
    "squad": "squad",  # SQuAD v1.1 dev: the CaMeLS/MAC-style test stream and the rest as train/valid
    "squad-train": "squad_train",  # SQuAD v1.1 train (17,725 train / 1,171 valid paragraphs)
    "qed": "qed",  # Natural Questions with their Wikipedia paragraph (QED)
    "archivalqa": "archivalqa_proxy",
    "archivalqa_proxy": "archivalqa_proxy",
}
"""Ready datasets of ../shared/data by source name (several names may share a folder)."""


# ---- files ----------------------------------------------------------------------------------------


def load_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Documents from a (gzipped or plain) JSONL file; each needs "text" and may have "questions"."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            doc = json.loads(line)
            if not isinstance(doc.get("text"), str) or not doc["text"].strip():
                raise ValueError(f"{path}:{n + 1}: a document needs a non-empty 'text'")
            doc.setdefault("doc_id", f"{path.stem}-{n}")
            doc.setdefault("title", "")
            doc.setdefault("date", None)
            for i, q in enumerate(doc.setdefault("questions", [])):
                q.setdefault("qid", f"{doc['doc_id']}-q{i}")
                if not q.get("answers"):
                    raise ValueError(f"{path}:{n + 1}: question {q.get('qid')} has no answers")
            docs.append(doc)
    return docs


def write_jsonl(path: str | Path, docs: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps(doc) + "\n")
    return path


def load_split(dataset: str, split: str, limit: int | None = None, root: Path = SHARED_DATA) -> list[dict[str, Any]]:
    """A ready split: a DATASETS name ("squad", "squad-train", "qed", "archivalqa"); split "train", "valid",
    "test" (or "qa_train"...) as the dataset has them."""
    folder = DATASETS.get(dataset)
    if folder is None:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    return load_jsonl(root / folder / f"{split}.jsonl.gz", limit)


def load_source(source: str, split: str, seed: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """"synthetic[:N]" (default stream, N entities), "synthetic-demo[:N]" (the demo's stream: one-word
    answers from small pools), a DATASETS name ("squad", "squad-train", "qed", "archivalqa") or a JSONL path
    pattern with {split}. Mixtures of several sources: `Mixture`."""
    if source.startswith("synthetic"):
        name, _, n = source.partition(":")
        base = DEMO_SYNTHETIC if name == "synthetic-demo" else SyntheticConfig()
        if name not in ("synthetic", "synthetic-demo"):
            raise ValueError(f"unknown synthetic source {source!r}: synthetic[:N] or synthetic-demo[:N]")
        docs = synthetic_stream(replace(base, num_entities=int(n) if n else base.num_entities, seed=seed))[split]
    elif source in DATASETS:
        docs = load_split(source, split)
    else:
        docs = load_jsonl(source.format(split=split))
    return docs[:limit] if limit is not None else docs


# ---- examples -------------------------------------------------------------------------------------


def timestamp(value: str | None) -> float:
    """Seconds since the epoch of an ISO date (or datetime); 0 when unknown."""
    if not value:
        return 0.0
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return 0.0
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@dataclass
class QAExample:
    qid: str
    question: str
    answers: list[str]
    doc_id: str
    document: str
    timestamp: float
    kind: str = "single"
    related: list[str] = field(default_factory=list)
    """doc_ids of other documents about the same entity (superseded reports: hard distractors)."""


def examples(docs: Sequence[dict[str, Any]]) -> list[QAExample]:
    """One example per question, in stream order."""
    by_entity: dict[str, list[str]] = {}
    for d in docs:
        if d.get("entity"):
            by_entity.setdefault(d["entity"], []).append(d["doc_id"])
    out = []
    for d in docs:
        related = [i for i in by_entity.get(d.get("entity") or "", []) if i != d["doc_id"]]
        for q in d.get("questions", []):
            out.append(
                QAExample(
                    qid=q["qid"], question=q["question"], answers=list(q["answers"]), doc_id=d["doc_id"],
                    document=d["text"], timestamp=timestamp(d.get("date")), kind=q.get("kind", "single"),
                    related=related,
                )
            )
    return out


# ---- synthetic news stream ------------------------------------------------------------------------

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "pr", "r", "s", "st", "t",
           "tr", "v", "z", "th", "sh", "ch", "qu", "h", "j", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia", "ae"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk", "sk"]
_COMPANY_SUFFIX = ["Group", "Holdings", "Works", "Labs", "Industries", "Systems", "Partners", "Foods", "Motors",
                   "Energy", "Textiles", "Robotics"]
_FILLERS = [
    "Analysts said the move had been expected for some weeks.",
    "Shares were little changed in early trading.",
    "The announcement came after a board meeting on Monday.",
    "A spokesperson declined to comment further.",
    "Local officials welcomed the news.",
    "The company did not disclose the financial terms.",
    "Industry observers called the decision unusual.",
    "Further details are expected later this month.",
]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
    ).capitalize()


def _unique_words(rng: random.Random, n: int, taken: set[str], syllables: tuple[int, ...] = (2, 3)) -> list[str]:
    out = []
    while len(out) < n:
        w = _word(rng, rng.choice(syllables))
        if w not in taken and 4 <= len(w) <= 12:
            taken.add(w)
            out.append(w)
    return out


# Fact kinds: (value pool, document templates, question templates, updatable)
_TEMPLATES: dict[str, dict[str, list[str]]] = {
    "city": {
        "doc": [
            "{E} said on {D} that it has moved its headquarters to {V}.",
            "On {D}, {E} opened its new head office in the city of {V}.",
            "{E} announced on {D} that its main offices are now in {V}.",
        ],
        "q": ["In which city is {E} headquartered?", "Where are the head offices of {E}?"],
    },
    "ceo": {
        "doc": [
            "On {D}, {E} named {V} as its new chief executive.",
            "{E} said on {D} that {V} will lead the company as chief executive.",
            "The board of {E} appointed {V} chief executive on {D}.",
        ],
        "q": ["Who is the chief executive of {E}?", "Who leads {E} as chief executive?"],
    },
    "product": {
        "doc": [
            "{E} launched a product called {V} on {D}.",
            "On {D}, {E} unveiled its latest product, the {V}.",
            "{E} began selling a new product named {V} on {D}.",
        ],
        "q": ["What product did {E} launch?", "What is the name of the product {E} unveiled?"],
    },
    "staff": {
        "doc": [
            "{E} said on {D} that it now employs {V} people.",
            "On {D}, {E} reported a workforce of {V} employees.",
            "{E} has {V} staff, the company said on {D}.",
        ],
        "q": ["How many people does {E} employ?", "How many employees does {E} have?"],
    },
}
UPDATABLE = ("ceo", "staff")


@dataclass
class SyntheticConfig:
    seed: int = 0
    num_entities: int = 600
    """Entities that get questions, split train/valid/test by entity."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    kinds: tuple[str, ...] = ("city", "ceo", "product", "staff")
    """Fact kinds per entity (each entity gets one document per kind, two for an update)."""
    update_prob: float = 0.5
    """Chance that an updatable fact (ceo, staff) is reported twice; the later report supersedes."""
    distractor_ratio: float = 0.5
    """Distractor documents (about other fictional entities, no questions) per question document."""
    pool_size: int = 60
    """Values per kind (cities, people, products): shared by all splits, so the LLM can spell them;
    the entity → value facts are new in every split."""
    fillers: int = 1
    """Filler sentences added to each document (0 = one-sentence documents)."""
    start: str = "2024-01-01"
    days: int = 720


DEMO_SYNTHETIC = SyntheticConfig(seed=0, num_entities=600, kinds=("city", "product", "staff"), pool_size=12)
"""The demo's stream: one-word answers from small shared pools (12 per kind) about invented companies,
the setting in which ~7 CPU minutes of Θ/ψ/π training learn to carry facts."""


def _pools(rng: random.Random, size: int, taken: set[str]) -> dict[str, list[str]]:
    first, last = _unique_words(rng, size, taken, (2,)), _unique_words(rng, size, taken, (2, 3))
    people = [f"{first[i]} {last[(i * 7 + 3) % size]}" for i in range(size)]
    numbers = sorted({str(rng.randrange(120, 9800)) for _ in range(size * 2)})[:size]
    return {
        "city": _unique_words(rng, size, taken, (2, 3)),
        "ceo": people,
        "product": _unique_words(rng, size, taken, (2, 3)),
        "staff": numbers,
    }


def synthetic_stream(config: SyntheticConfig | None = None) -> dict[str, list[dict[str, Any]]]:
    """Documents of each split ("train", "valid", "test"), sorted by date: the stream order.

    The same config always gives the same stream. Entities never cross splits; distractor documents
    are about their own entities (no questions) and are mixed into the same split's stream.
    """
    config = config or SyntheticConfig()
    for kind in config.kinds:
        if kind not in _TEMPLATES:
            raise ValueError(f"unknown fact kind {kind!r}; known: {sorted(_TEMPLATES)}")
    rng = random.Random(config.seed)
    taken: set[str] = set()
    pools = _pools(random.Random(f"pools-{config.pool_size}-{config.seed}"), config.pool_size, taken)
    names = _unique_words(rng, int(config.num_entities * (1 + config.distractor_ratio)) + 3, taken, (2, 3))
    # Suffix and split are functions of the name alone: a stream with more entities (same seed) is a
    # superset whose entities keep their split, so a longer test stream never holds a training entity.
    entities = [f"{n} {random.Random(f'suffix-{n}').choice(_COMPANY_SUFFIX)}" for n in names]
    n_q = config.num_entities
    question_entities = entities[:n_q]
    f_train, f_valid = config.split_fractions[0], config.split_fractions[0] + config.split_fractions[1]

    def split_for(entity: str) -> str:
        u = int(hashlib.sha256(f"{config.seed}:{entity}".encode()).hexdigest()[:12], 16) / 16**12
        return "train" if u < f_train else "valid" if u < f_valid else "test"

    split_of = {e: split_for(e) for e in entities}

    start = date.fromisoformat(config.start)
    out: dict[str, list[dict[str, Any]]] = {"train": [], "valid": [], "test": []}

    def report(entity: str, kind: str, value: str, when: date, with_question: bool, qkind: str) -> dict[str, Any]:
        t = _TEMPLATES[kind]
        sentence = rng.choice(t["doc"]).format(E=entity, D=when.strftime("%B %d, %Y").replace(" 0", " "), V=value)
        text = " ".join([sentence] + rng.sample(_FILLERS, config.fillers))
        doc_id = f"tmp-{len(out[split_of[entity]]):06d}"
        doc = {
            "doc_id": doc_id, "title": f"{entity}: {kind}", "text": text, "date": when.isoformat(),
            "entity": entity, "kind": kind, "questions": [],
        }
        if with_question:
            doc["questions"].append(
                {"qid": f"{doc_id}-q", "question": rng.choice(t["q"]).format(E=entity), "answers": [value],
                 "kind": qkind}
            )
        out[split_of[entity]].append(doc)
        return doc

    asked_set = set(question_entities)
    for entity in entities:
        asked = entity in asked_set
        for kind in config.kinds:
            values = rng.sample(pools[kind], 2)
            day = rng.randrange(config.days - 60)
            first = start + timedelta(days=day)
            if kind in UPDATABLE and rng.random() < config.update_prob:
                later = first + timedelta(days=rng.randrange(7, 60))
                report(entity, kind, values[0], first, False, "")
                report(entity, kind, values[1], later, asked, "latest")
            else:
                report(entity, kind, values[0], first, asked, "single")
    for split, docs in out.items():
        docs.sort(key=lambda d: (d["date"], d["doc_id"]))  # tmp ids: creation order breaks ties
        for i, d in enumerate(docs):  # readable ids in stream order
            new_id = f"syn{config.seed}-{split}-{i:06d}"
            for q in d["questions"]:
                q["qid"] = f"{new_id}-q"
            d["doc_id"] = new_id
    return out
