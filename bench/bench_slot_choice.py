"""Which slots of a token-pool memory should a question read? The gold document's memory forced (no
retrieval), SmolLM2 answering through the real memory path (ψ, π, the checkpoint's prompt), for:

- the checkpoint as trained: k stretch slots, all read;
- S stored slots (token picks, m per slot), of which each question reads the p it chooses
  (AggregatorConfig.select_slots, service/models/slot_select.py), for each S, m and select_width.

No training: the token pool has no per-slot weights, so the trained pool stores any number of slots.

    .venv/bin/python bench/bench_slot_choice.py --checkpoint models/smollm2-135m-instruct \\
        [--data squad --split valid --questions 160 --stored 160,256 --picks 1,8 --widths 16,32] \\
        [--pick-rules stretch,distinct]

writes bench/results/slot-choice-<data>-<split>.json.
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

from service.models.checkpoint import checkpoint_profile, load_checkpoint  # noqa: E402
from service.models.cmt import CMTModules, CMTPipeline  # noqa: E402
from service.models.compressor import Compressor  # noqa: E402
from service.models.config import CMTConfig  # noqa: E402
from service.models.llm import HFCausalLM  # noqa: E402
from trainer.data import load_split  # noqa: E402
from trainer.eval_answer import generation_config  # noqa: E402
from trainer.rekey import carry_trained_weights  # noqa: E402
from trainer.scoring import aggregate  # noqa: E402

BATCH = 16


def variant(modules: CMTModules, layout, stored: int, picks: int, read: int, width: float, pull: str = "nearest",
            own_weight: float | None = None, pick_rule: str | None = None) -> CMTModules:
    """The trained modules storing `stored` slots of `picks` token picks chosen by `pick_rule`, each question
    reading `read`."""
    c, a = modules.config.compressor, modules.config.aggregator
    own = a.select_own_weight if own_weight is None else own_weight
    config = CMTConfig(
        dataclasses.replace(c, num_memory_tokens=stored, stored_picks=picks, pick_rule=pick_rule or c.pick_rule),
        dataclasses.replace(a, select_slots=read, select_width=width, select_pull=pull, select_own_weight=own),
        modules.config.aligner,
    )
    theta = modules.compressor  # the variant shares its frozen backbone and key encoder
    out = CMTModules(config, Compressor(config.compressor, theta.backbone, theta.tokenizer, theta.key_encoder), layout)
    carry_trained_weights(modules, out)
    return out.eval()


@torch.inference_mode()
def scores(modules: CMTModules, llm: HFCausalLM, exs: list, profile, alpha: float = 0.0) -> dict:
    """Each question answered with its gold document's memory (the slots it chooses, when it chooses)."""
    prompts = CMTPipeline(modules, llm, profile).prompts([e.question for e in exs])
    preds = []
    for i in range(0, len(exs), BATCH):
        part = exs[i : i + BATCH]
        q = modules.compressor.compress([e.question for e in part])
        docs = modules.compressor.compress([e.document for e in part])
        slots = None
        if modules.config.aggregator.select_slots:
            slots = modules.choose_slots([e.question for e in part], docs.picks[0][:, None], docs.picks[1][:, None])
        prefix, has = modules.prefix(q.memory, docs.memory[:, None], torch.ones(len(part), 1, dtype=torch.bool), llm,
                                     slots)
        gen = generation_config(alpha, 16, profile)
        preds += [g.text for g in llm.generate(prompts[i : i + BATCH], prefix, has, gen)]
    return aggregate(preds, [e.answers for e in exs])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a token-pool checkpoint")
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="squad")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--questions", type=int, default=160)
    parser.add_argument("--stored", default="160,256", help="stored slots S")
    parser.add_argument("--picks", default="1,8", help="token picks m per stored slot")
    parser.add_argument("--widths", default="16,32", help="select_width values")
    parser.add_argument("--read", type=int, default=0, help="slots each question reads (0 = the checkpoint's)")
    parser.add_argument("--pulls", default="nearest", help="select_pull values: nearest, sum")
    parser.add_argument("--own-weights", default="", help="select_own_weight values (default: the checkpoint's)")
    parser.add_argument("--pick-rules", default="", help="CompressorConfig.pick_rule values: stretch, distinct, "
                        "spaced (distinct and spaced need --picks 1; default: the checkpoint's)")
    parser.add_argument("--alpha", type=float, default=0.0,
                        help="memory-aware decoding weight α (the service's default is the checkpoint's metrics.alpha)")
    parser.add_argument("--skip-checkpoint-row", action="store_true", help="no row for the checkpoint as it is")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = HFCausalLM.from_pretrained(args.llm)
    modules, config = load_checkpoint(args.checkpoint, llm.identity, llm.layout)
    if modules.compressor.token_pool is None:
        parser.error(f"{args.checkpoint} has no token pool (memory_values='token_embeddings')")
    profile = checkpoint_profile(config)
    exs = examples(load_split(args.data, args.split))[: args.questions]
    read = args.read or modules.config.slots_read
    base = modules.config.compressor
    rows = []
    start = time.perf_counter()
    plain = {"stored": base.num_memory_tokens, "picks": base.stored_picks, "read": modules.config.slots_read,
             "width": modules.config.aggregator.select_width if modules.config.aggregator.select_slots else None}
    if not args.skip_checkpoint_row:
        rows.append({**plain, **scores(modules, llm, exs, profile, args.alpha)})
        print(rows[-1], flush=True)
    owns = [float(w) for w in args.own_weights.split(",") if w] or [modules.config.aggregator.select_own_weight]
    pick_rules = args.pick_rules.split(",") if args.pick_rules else [base.pick_rule]
    grid = itertools.product(map(int, args.stored.split(",")), map(int, args.picks.split(",")),
                             map(float, args.widths.split(",")), args.pulls.split(","), owns, pick_rules)
    for stored, picks, width, pull, own, pick_rule in grid:
        chosen = variant(modules, llm.layout, stored, picks, read, width, pull, own, pick_rule)
        rows.append({"stored": stored, "picks": picks, "pick_rule": pick_rule, "read": read, "width": width,
                     "pull": pull, "own_weight": own, **scores(chosen, llm, exs, profile, args.alpha)})
        print(rows[-1], flush=True)
    report = {"checkpoint": str(args.checkpoint), "data": f"{args.data} {args.split}", "questions": len(exs),
              "alpha": args.alpha,
              "gold_document_forced": True, "seconds": time.perf_counter() - start,
              "command": "python bench/bench_slot_choice.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"slot-choice-{args.data}-{args.split}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
