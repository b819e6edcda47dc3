"""Recall@1/5 of the gold document with a checkpoint's retrieval keys alone (no memory, no LLM): a minute
where the full evaluation (bench_eval_smollm2.py) takes an hour on CPU. For a key from a key encoder, also
each part of it alone (the dense part, the lexical part).

    .venv/bin/python bench/bench_key_recall.py --checkpoint models/smollm2-135m-instruct --dataset archivalqa

Writes bench/results/key-recall-<dataset>-<split>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from service.models.checkpoint import MODULE_FILES, read_checkpoint_config
from service.models.compressor import Compressor
from service.models.config import CMTConfig
from trainer.data import load_split

RESULTS = Path(__file__).resolve().parent / "results"


def keys(compressor: Compressor, texts: list[str], batch: int = 64) -> torch.Tensor:
    """(N, d_k) retrieval keys. A key from a key encoder needs neither Θ's memory nor its backbone."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            chunks = compressor.tokenize(texts[i : i + batch])
            if compressor.key_encoder is not None:
                out.append(compressor._key(chunks, None, None))
            else:
                out.append(compressor(chunks).key)
    return torch.cat(out).float()


def recall(q: torch.Tensor, d: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    top = (q @ d.T).topk(min(5, d.shape[0]), dim=1).indices  # (Q, 5)
    return {"recall_at_1": round(100 * (top[:, 0] == gold).float().mean().item(), 1),
            "recall_at_5": round(100 * (top == gold[:, None]).any(1).float().mean().item(), 1)}


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
    gold = torch.tensor([i for _, i in pairs])
    start = time.perf_counter()
    d, q = keys(compressor, [x["text"] for x in docs]), keys(compressor, [x for x, _ in pairs])
    rows = {"checkpoint keys": recall(q, d, gold)}
    if compressor.key_encoder is not None:
        d_s = compressor.key_encoder.width
        rows["dense part only"] = recall(q[:, :d_s], d[:, :d_s], gold)
        if compressor.lexical_key is not None:
            rows["lexical part only"] = recall(q[:, d_s:], d[:, d_s:], gold)
    out = {"checkpoint": str(args.checkpoint), "compressor_version": config["compressor_version"],
           "dataset": args.dataset, "split": args.split, "documents": len(docs), "questions": len(pairs),
           "seconds": round(time.perf_counter() - start, 1), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    target = RESULTS / f"key-recall-{args.dataset}-{args.split}.json"
    target.write_text(json.dumps(out, indent=1))
    for name, r in rows.items():
        print(f"{name:20s} r@1 {r['recall_at_1']:5.1f} r@5 {r['recall_at_5']:5.1f}")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
