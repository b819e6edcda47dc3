"""Recall@1/5 of the gold document with a checkpoint's retrieval keys alone (no memory, no LLM): a minute
where the full evaluation (bench_eval_smollm2.py) takes an hour on CPU. For a key from a key encoder, also
each part of it alone (the dense part, the lexical part), and, when the checkpoint re-ranks its best candidates by
their word pieces and sentences (AggregatorConfig.rerank_candidates), what the service selects, what the
re-ranking shipped before the lexical stage selected (the best 4 by their sentences at weight 0.3), and what the
shipped one costs per question on cold caches (every candidate's sentences encoded and word pieces counted) and on
warm ones.

    .venv/bin/python bench/bench_key_recall.py --checkpoint models/smollm2-135m-instruct --dataset archivalqa

Writes bench/results/key-recall-<dataset>-<split>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from service.models.checkpoint import MODULE_FILES, read_checkpoint_config
from service.models.compressor import Compressor
from service.models.config import CMTConfig
from service.models.sentence_rerank import Reranker
from trainer.data import load_split
from trainer.eval_retrieval import _recall, key_part_recall, write_recall_report

RESULTS = Path(__file__).resolve().parent / "results"


def keys(compressor: Compressor, texts: list[str], batch: int = 64) -> torch.Tensor:
    """(N, d_k) retrieval keys, in batches."""
    return torch.cat([compressor.keys(texts[i : i + batch]) for i in range(0, len(texts), batch)]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("models/smollm2-135m-instruct"))
    parser.add_argument("--dataset", default="archivalqa")
    parser.add_argument("--split", default="test")
    parser.add_argument("--questions", type=int, default=None, help="first N questions (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = read_checkpoint_config(args.checkpoint)
    compressor = Compressor.from_backbone(CMTConfig.from_dict(config["cmt"]).compressor)
    state = load_file(str(args.checkpoint / MODULE_FILES["compressor"]))
    compressor.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    compressor.eval()

    docs = load_split(args.dataset, args.split)
    pairs = [(q["question"], i) for i, d in enumerate(docs) for q in d["questions"]][: args.questions]
    gold = [i for _, i in pairs]
    start = time.perf_counter()
    d, q = keys(compressor, [x["text"] for x in docs]), keys(compressor, [x for x, _ in pairs])
    rows = {"cmt_keys": _recall(q @ d.T, gold)} | key_part_recall(compressor, q, d, gold)
    header = {"checkpoint": str(args.checkpoint), "compressor_version": config["compressor_version"],
              "dataset": args.dataset, "split": args.split, "documents": len(docs), "questions": len(pairs),
              "seconds": round(time.perf_counter() - start, 1)}
    aggregator = CMTConfig.from_dict(config["cmt"]).aggregator
    if aggregator.rerank_candidates:  # what the service selects: the best C re-scored (sentence_rerank.Reranker)
        variants = {"": aggregator}
        if aggregator.rerank_lexical_weight > 0:  # for comparison: what was shipped before the lexical stage
            variants["_sentences_only_w0.3"] = dataclasses.replace(
                aggregator, rerank_candidates=4, rerank_lexical_weight=0.0, rerank_sentence_candidates=0,
                rerank_sentence_weight=0.3)
        questions = [x for x, _ in pairs]
        for suffix, agg in variants.items():
            C = agg.rerank_candidates
            pool = (q @ d.T).topk(max(C, 5), dim=1)  # (Q, max(C, 5)); the ones after C keep their key order
            texts = [[docs[i]["text"] for i in row[:C]] for row in pool.indices.tolist()]
            reranker, start = Reranker.build(agg, compressor), time.perf_counter()
            scores = reranker(questions, q, pool.values[:, :C], texts)  # (Q, C), every cache cold
            cold = time.perf_counter() - start
            start = time.perf_counter()
            reranker(questions, q, pool.values[:, :C], texts)  # every cache warm
            warm = time.perf_counter() - start
            if not suffix:
                header |= {"rerank_ms_per_question_first_pass": round(1e3 * cold / len(pairs), 2),
                           "rerank_ms_per_question_warm_cache": round(1e3 * warm / len(pairs), 3)}
            first = pool.indices[:, :C].gather(1, scores.argsort(dim=1, descending=True))  # (Q, C)
            rows[f"cmt_keys_reranked_top_{C}{suffix}"] = _recall(torch.cat([first, pool.indices[:, C:]], 1), gold,
                                                                 ranked=True)
    write_recall_report(RESULTS / f"key-recall-{args.dataset}-{args.split}.json", header, rows)


if __name__ == "__main__":
    main()
