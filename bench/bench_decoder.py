"""The continuous decoder alone, in process, per LLM dtype: 32 questions with KV prefixes joined in one step
(prefill), then decoded to the end (no stop string, so every row decodes --new-tokens).

    .venv/bin/python bench/bench_decoder.py [--questions 32] [--prefix-len 16] [--new-tokens 16] [--rounds 4]
        [--dtypes float32,bfloat16] [--stores growing,slab]

Uses bench_service.py's randomly initialised GPT-2-small-shaped LLM (built once into bench/.cache). What the
service adds on top (HTTP, Θ/ψ/π on the same cores) is bench_service.py's. Writes bench/results/decoder.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_service import build_models  # noqa: E402

from service.models.continuous import ContinuousDecoder  # noqa: E402
from service.models.llm import GenerationConfig, HFCausalLM  # noqa: E402
from service.models.prefix import KVPrefix  # noqa: E402
from service.runtime.engine import DTYPES, cpu_has_native_bf16  # noqa: E402


def random_prefix(llm: HFCausalLM, length: int, g: torch.Generator) -> KVPrefix:
    """A prefix of batch 1: (1, H_kv, p, hd) keys and values per layer."""
    shape = (1, llm.layout.num_kv_heads, length, llm.layout.head_dim)
    return KVPrefix([torch.randn(shape, generator=g) for _ in range(llm.layout.num_layers)],
                    [torch.randn(shape, generator=g) for _ in range(llm.layout.num_layers)])


def one_round(decoder: ContinuousDecoder, requests) -> dict[str, float]:
    start = time.perf_counter()
    decoder.add_many(requests)
    prefill = time.perf_counter() - start
    steps = []
    while decoder.rows:
        t = time.perf_counter()
        decoder.step()
        steps.append(time.perf_counter() - t)
    return {"prefill_s": prefill, "step_ms": 1e3 * statistics.median(steps), "total_s": prefill + sum(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--prefix-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per dtype (after one warm-up); best kept")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--stores", default="growing",
                        help="the running cache's stores to time (service.models.kv_slab): growing, slab")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decoder.json")
    args = parser.parse_args()

    llm_dir, _ = build_models()
    result = {"questions": args.questions, "prefix_len": args.prefix_len, "new_tokens": args.new_tokens,
              "torch_threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_native_bf16(), "dtypes": {}}
    for name in args.dtypes.split(","):
        llm = HFCausalLM.from_pretrained(str(llm_dir), dtype=DTYPES[name])
        g = torch.Generator().manual_seed(0)
        config = GenerationConfig(max_new_tokens=args.new_tokens)
        questions = [f"Question: What happened to the bridge in report {i}-{7 * i}?\nAnswer:"
                     for i in range(args.questions)]
        requests = [(q, random_prefix(llm, args.prefix_len, g), config) for q in questions]
        for store in args.stores.split(","):
            decoder = ContinuousDecoder(llm, max_rows=2 * args.questions, store=store)
            one_round(decoder, requests)  # warm-up
            rounds = [one_round(decoder, requests) for _ in range(args.rounds)]
            best = min(rounds, key=lambda r: r["total_s"])
            key = name if store == "growing" else f"{name}/{store}"
            result["dtypes"][key] = {**best, "answers_per_s": args.questions / best["total_s"], "rounds": rounds}
            print(key, json.dumps({k: round(v, 3) for k, v in best.items()}), flush=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
