"""Choose an LLM's prompt profile on the valid splits: the gold-paragraph row and the no-memory row of
every profile (service/models/prompts.py), official EM/F1, containment and answer length apart.

    .venv/bin/python bench/bench_prompt_profiles.py [--llm smollm2-135m-instruct] [--questions 100]

writes bench/results/prompt-profiles-<llm>.json and .md. Predictions are cached like the evaluation's
(trainer/prediction_cache.py), so a rerun costs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.models.llm import HFCausalLM
from service.models.prompts import PROFILES
from trainer.data import examples, load_split
from trainer.eval_answer import generation_config, prompt_text, run_prompts
from trainer.prediction_cache import DEFAULT_CACHE_DIR, PredictionCache
from trainer.scoring import aggregate

SPLITS = {"squad": "valid", "archivalqa": "valid"}
METRICS = ("em", "f1", "containment", "answer_words")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=100, help="first N questions of each valid split")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    llm = HFCausalLM.from_pretrained(args.llm)
    rows = []
    for data, split in SPLITS.items():
        exs = examples(load_split(data, split))[: args.questions]
        golds = [e.answers for e in exs]
        for name in args.profiles.split(","):
            profile = PROFILES[name]
            cache = PredictionCache(args.cache_dir, llm, profile, generation_config(profile=profile))
            for row, docs in (("no memory", [None] * len(exs)),
                              ("gold paragraph in prompt", [e.document for e in exs])):
                if row.startswith("gold") and not profile.shots_in_question_prompt:
                    continue  # its context prompts are those of the profile it is derived from
                prompts = [prompt_text(llm, profile, e.question, d) for e, d in zip(exs, docs, strict=True)]
                run = run_prompts(llm, prompts, cache, desc=f"{data} {name} {row}", progress=True)
                scores = aggregate(run.predictions, golds)
                rows.append({"data": f"{data} {split}", "profile": name, "row": row, "questions": len(exs),
                             **{m: scores[m] for m in METRICS}, "example": run.predictions[0]})
                print(json.dumps(rows[-1]), flush=True)
    stem = f"prompt-profiles-{Path(args.llm).name}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    lines = [f"# Prompt profiles of {args.llm} on the valid splits", "",
             f"`{' '.join(['.venv/bin/python bench/bench_prompt_profiles.py', *(argv or sys.argv[1:])])}`", "",
             "| data | profile | row | EM | F1 | containment | answer words |", "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['data']} | {r['profile']} | {r['row']} | {r['em']:.1f} | {r['f1']:.1f} | {r['containment']:.1f} "
              f"| {r['answer_words']:.1f} |" for r in rows]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
