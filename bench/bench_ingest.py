"""Ingest cost of the shipped checkpoint: documents per second through the service's compress path (Θ:
tokenize, the backbone where its states are read, the key encoder, what the bank stores), on real news-like
paragraphs (the SQuAD test stream), in this process, without Redis or HTTP.

    .venv/bin/python bench/bench_ingest.py [--checkpoint models/smollm2-135m-instruct] [--docs 512]
        [--batch 32] [--threads 2] [--device cpu] [--out bench/results/ingest-<device>.json]

Reports docs/s and ms per document, the documents' mean length in Θ's tokens, and the share of them that
fit in the checkpoint's k slots (under pick_rule="distinct" those are stored whole without running Θ's
backbone). A benchmark, not a test: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.runtime.engine import Engine  # noqa: E402
from service.settings import SHIPPED_CHECKPOINT, Settings  # noqa: E402
from trainer.data import load_split  # noqa: E402

REPEAT = 3
"""Timed passes over the documents (after one warm-up batch); the best one is reported."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT)
    parser.add_argument("--docs", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine.load(Settings(checkpoint=args.checkpoint, device=args.device))
    docs = [d["text"] for d in load_split("squad", "test")][: args.docs]
    batches = [docs[i : i + args.batch] for i in range(0, len(docs), args.batch)]
    engine.compress(batches[0])  # warm-up
    passes = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        for b in batches:
            engine.compress(b)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        passes.append(time.perf_counter() - start)
    theta, k = engine.modules.compressor, engine.num_memory_tokens
    lengths = [n for b in batches for n in theta.tokenize(b).doc_tokens().tolist()]  # Θ's tokens per document
    best = min(passes)
    report = {
        "checkpoint": str(args.checkpoint), "device": args.device, "torch_threads": torch.get_num_threads(),
        "compress_dtype": str(engine.compress_dtype), "pick_rule": theta.config.pick_rule, "slots": k,
        "documents": len(docs), "batch": args.batch, "docs_per_s": len(docs) / best,
        "ms_per_doc": 1000 * best / len(docs), "passes_s": passes,
        "mean_theta_tokens": sum(lengths) / len(lengths),
        "share_within_k_slots_pct": 100 * sum(n <= k for n in lengths) / len(lengths),
        "command": "python bench/bench_ingest.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(report, indent=1))  # noqa: T201
    out = args.out or Path(__file__).parent / "results" / f"ingest-{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
