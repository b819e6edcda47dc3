"""How much of a paragraph does SmolLM2 need? The gold row with the paragraph replaced by its n rarest words
(IDF over SQuAD train, kept in text order), no training involved: the ceiling that motivated Θ's token-pool
memory (service/models/token_pool.py). Measured 2026-12-03, 100 SQuAD valid questions, few-shot profile:
paragraph F1 29.5, 16 words 13.0, 32 words 18.9 (no memory: 1.5).

`--question-near` adds the n words nearest the question's rare words (each word scored by the IDF of the
closest question word in the paragraph, decaying as 1 / (1 + distance / width), plus 0.3 × its own IDF):
what motivated letting the question choose the memory slots it reads (service/models/slot_select.py).
Measured 2026-12-05, same 100 questions: 32 such words F1 28.7 (width 4), 30.2 (width 8), the whole
paragraph 29.5, the 32 rarest 18.9.

    .venv/bin/python bench/bench_extractive_oracle.py [--questions 100] [--words 16,32,48] [--question-near 4,8]
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.models.llm import HFCausalLM
from service.models.prompts import get_profile
from trainer.data import load_split
from trainer.eval_answer import generation_config, prompt_text
from trainer.scoring import aggregate


def rarest_words(text: str, n: int, idf) -> str:
    words = re.findall(r"\S+", text)
    keep = sorted(range(len(words)), key=lambda i: -idf(re.sub(r"\W", "", words[i]) or "the"))[:n]
    return " ".join(words[i] for i in sorted(keep))


def question_near_words(text: str, question: str, n: int, idf, width: float) -> str:
    """The n words of `text` nearest the question's rare words (IDF > 2), in text order."""
    norm = lambda w: re.sub(r"\W", "", w.lower())  # noqa: E731
    words = re.findall(r"\S+", text)
    asked = {w for w in map(norm, re.findall(r"\S+", question)) if w and idf(w) > 2.0}
    hits = [i for i, w in enumerate(words) if norm(w) in asked]

    def score(i: int) -> float:
        near = max((idf(norm(words[j])) / (1 + abs(i - j) / width) for j in hits), default=0.0)
        return near + 0.3 * idf(norm(words[i]) or "the")

    keep = sorted(range(len(words)), key=lambda i: -score(i))[:n]
    return " ".join(words[i] for i in sorted(keep))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--words", default="16,32,48")
    parser.add_argument("--question-near", default="", help="widths: add the n words nearest the question's")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train = load_split("squad-train", "train")
    df = collections.Counter(w for d in train for w in set(re.findall(r"\w+", d["text"].lower())))
    idf = lambda w: math.log((len(train) + 1) / (df[w.lower()] + 1))  # noqa: E731
    docs = load_split("squad", "valid")
    qs = [(d, q) for d in docs for q in d["questions"]][: args.questions]
    llm = HFCausalLM.from_pretrained("smollm2-135m-instruct")
    profile = get_profile("fewshot-context")
    gen = generation_config(0.0, 16, profile)
    sizes = list(map(int, args.words.split(",")))
    variants = {"paragraph": lambda t, q: t} | {f"{n} rarest words": (lambda t, q, n=n: rarest_words(t, n, idf))
                                                for n in sizes}
    for width in (float(w) for w in args.question_near.split(",") if w):
        variants |= {f"{n} words nearest the question's (width {width:g})":
                     (lambda t, q, n=n, w=width: question_near_words(t, q, n, idf, w)) for n in sizes}
    for name, cut in variants.items():
        prompts = [prompt_text(llm, profile, q["question"], cut(d["text"], q["question"])) for d, q in qs]
        preds = [g.text for i in range(0, len(prompts), 16) for g in llm.generate(prompts[i : i + 16], config=gen)]
        scores = aggregate(preds, [q["answers"] for _, q in qs])
        print(f"{name}: EM {scores['em']:.1f} F1 {scores['f1']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
