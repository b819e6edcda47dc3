"""Do the slots a question reads hold its answer? Gold document forced, no LLM: for each question, whether
every token of a gold answer is among the document's stored token picks, and among the p slots the question
chooses, for each slot-selection rule (AggregatorConfig.select_pull × select_own_weight × select_width); and
whether the answer's tokens appear in a row, in order, among the chosen slots as the LLM reads them (a
"2003" read as "203" holds every token of the answer but not the answer).
A cheap proxy for bench_slot_choice.py's answers: a slot rule is worth its LLM run when it holds more answers.

    .venv/bin/python bench/bench_answer_recall.py --checkpoint models/smollm2-135m-instruct \\
        [--questions 300] [--pick-rules stretch,distinct,spaced] [--pulls nearest,sum] [--own-weights 0,0.3] \\
        [--widths 8,16,32] [--case-forms 0,1]

writes bench/results/answer-recall-<data>-<split>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_memory_use import examples  # noqa: E402
from bench_slot_choice import variant  # noqa: E402

from service.models.checkpoint import load_checkpoint  # noqa: E402
from service.models.compressor import Compressor  # noqa: E402
from service.models.config import AggregatorConfig  # noqa: E402
from service.models.llm import HFCausalLM  # noqa: E402
from service.models.slot_select import question_token_ids, question_tokens, select_slots, slot_scores  # noqa: E402
from trainer.data import load_split  # noqa: E402

BATCH = 16


def answer_token_ids(tokenizer, answers: list[str]) -> list[list[int]]:
    """Each gold answer as the tokens it is inside a text (after a space) and at its start."""
    texts = [prefix + a.strip() for a in answers for prefix in (" ", "")]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def holds(tokens: set[int], answers: list[list[int]]) -> bool:
    return any(ids and all(t in tokens for t in ids) for ids in answers)


def holds_in_a_row(read: list[int], answers: list[list[int]]) -> bool:
    """Whether some gold answer's tokens are a run of the tokens read, in order."""
    return any(ids and any(read[i : i + len(ids)] == ids for i in range(len(read) - len(ids) + 1)) for ids in answers)


@torch.inference_mode()
def recall(theta: Compressor, a: AggregatorConfig, exs: list, rules: list[tuple[str, float, float, bool]]) -> dict:
    """% of questions whose whole answer is among the stored slots, and among the chosen ones per rule
    (select_pull, select_own_weight, select_width, select_case_forms)."""
    salience = theta.token_pool.token_salience.detach()  # (V,)
    spaced = theta.config.pick_rule == "spaced"
    chosen_hits, in_a_row, stored_hits = dict.fromkeys(rules, 0), dict.fromkeys(rules, 0), 0
    for i in range(0, len(exs), BATCH):
        part = exs[i : i + BATCH]
        ids, weights = theta.compress([e.document for e in part]).picks  # (b, k, m)
        ids, weights = ids[:, None], weights[:, None]  # (b, 1, k, m): one document each
        questions = [e.question for e in part]
        asked = {forms: question_tokens(question_token_ids(theta.tokenizer, questions, forms), salience,
                                        a.select_min_salience) for forms in {r[3] for r in rules}}  # (b, V) each
        answers = [answer_token_ids(theta.tokenizer, e.answers) for e in part]
        heaviest = ids[:, 0, :, 0].tolist()  # (b, k) each slot's heaviest pick
        filled = (weights[:, 0].float().sum(-1) > 0).tolist()  # (b, k) False = a continuation slot
        stored_hits += sum(holds({t for t, f in zip(h, hf, strict=True) if f}, ans)
                           for h, hf, ans in zip(heaviest, filled, answers, strict=True))
        for rule in rules:
            pull, own, width, forms = rule
            scores = slot_scores(asked[forms], ids, weights, salience, width, own, pull, spaced=spaced)
            slots = select_slots(scores, a.select_slots)  # (b, p)
            for h, hf, ans, s in zip(heaviest, filled, answers, slots.tolist(), strict=True):
                chosen_hits[rule] += holds({h[j] for j in s if hf[j]}, ans)
                in_a_row[rule] += holds_in_a_row([h[j] for j in s if hf[j]], ans)  # a weight-0 slot reads as nothing
    n = len(exs)
    return {"answer_in_stored_slots": 100 * stored_hits / n,
            "answer_in_chosen_slots": [{"pull": p, "own_weight": o, "width": w, "case_forms": f,
                                        "percent": 100 * h / n, "in_a_row_percent": 100 * in_a_row[(p, o, w, f)] / n}
                                       for (p, o, w, f), h in chosen_hits.items()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint storing token picks")
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="squad")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--pulls", default="nearest,sum")
    parser.add_argument("--own-weights", default="0,0.3")
    parser.add_argument("--widths", default="8,16,32")
    parser.add_argument("--case-forms", default="",
                        help="AggregatorConfig.select_case_forms values: 0, 1 or 0,1 (default: the checkpoint's)")
    parser.add_argument("--lower-case-questions", action="store_true",
                        help="ask every question in lower case, as many users type them")
    parser.add_argument("--pick-rules", default="",
                        help="CompressorConfig.pick_rule values: stretch, distinct, spaced (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = HFCausalLM.from_pretrained(args.llm)
    modules, _ = load_checkpoint(args.checkpoint, llm.identity, llm.layout)
    a, theta = modules.config.aggregator, modules.compressor
    if not (a.select_slots and theta.token_pool is not None):
        parser.error(f"{args.checkpoint} does not store token picks read by select_slots")
    exs = examples(load_split(args.data, args.split))[: args.questions]
    if args.lower_case_questions:
        exs = [dataclasses.replace(e, question=e.question.lower()) for e in exs]
    rules = list(itertools.product(args.pulls.split(","), map(float, args.own_weights.split(",")),
                                   map(float, args.widths.split(",")),
                                   [bool(int(f)) for f in args.case_forms.split(",")] if args.case_forms
                                   else [a.select_case_forms]))
    start = time.perf_counter()
    per_rule = []
    for pick_rule in args.pick_rules.split(",") if args.pick_rules else [theta.config.pick_rule]:
        c = modules.config.compressor
        stored = variant(modules, llm.layout, c.num_memory_tokens, c.stored_picks, a.select_slots, a.select_width,
                         a.select_pull, a.select_own_weight, pick_rule).compressor
        per_rule.append({"pick_rule": pick_rule, **recall(stored, a, exs, rules)})
    report = {"checkpoint": str(args.checkpoint), "data": f"{args.data} {args.split}", "questions": len(exs),
              "questions_lower_cased": args.lower_case_questions,
              "gold_document_forced": True, "stored_slots": modules.config.compressor.num_memory_tokens,
              "slots_read": a.select_slots, "seconds": time.perf_counter() - start,
              "command": "python bench/bench_answer_recall.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "pick_rules": per_rule}
    print(json.dumps(report, indent=1), flush=True)  # noqa: T201
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"answer-recall-{args.data}-{args.split}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
