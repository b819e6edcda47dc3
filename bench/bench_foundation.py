"""Foundation benchmark: Θ throughput and the cost of memory (ψ + π + KV prefix) at answer time.

    .venv/bin/python bench/bench_foundation.py [--device cuda] [--repeats 10]

1. Θ throughput: documents/s for 256-token documents in batches of 32 (packaged MiniLM backbone).
2. Overhead of ψ + π + prefix over a bare `generate` of 16 new tokens, for a randomly initialised
   GPT-2-small-sized LLM (12 layers, 768 wide, 50,257 vocabulary), top_k = 4, p = 16.
Writes bench/results/foundation[-<device>].json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from service.models.cmt import CMTModules
from service.models.config import CMTConfig, CompressorConfig
from service.models.llm import GenerationConfig, HFCausalLM
from trainer.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "squad" / "test.jsonl.gz"


def timed(fn, repeats: int, sync) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lexical-key-weight", type=float, default=0.5,
                        help="β of the key's lexical part (0 = dense key only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with gzip.open(DATA, "rt") as fh:
        texts = [json.loads(line)["text"] for _, line in zip(range(400), fh, strict=False)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=4096)
    torch.manual_seed(0)
    llm = HFCausalLM(
        GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0)).to(device), tokenizer, "gpt2-small-random"
    )
    config = CMTConfig(compressor=CompressorConfig(lexical_key_weight=args.lexical_key_weight))
    modules = CMTModules.build(config, llm.layout).to(device).eval()
    compressor = modules.compressor

    # 1. Θ throughput on 256-token documents (one backbone window each).
    long_text = " ".join(texts)
    ids = compressor.tokenizer(long_text, add_special_tokens=False)["input_ids"]
    docs = [compressor.tokenizer.decode(ids[i * 250 : (i + 1) * 250]) for i in range(args.batch)]
    batch = compressor.tokenize(docs)
    tokens_per_doc = float(batch.attention_mask.sum(1).float().mean())
    with torch.inference_mode():
        t_theta = timed(lambda: compressor(batch), args.repeats, sync)
    tok_t = timed(lambda: compressor.tokenize(docs), args.repeats, sync)
    theta = {
        "docs_per_s_forward": args.batch / statistics.median(t_theta),
        "docs_per_s_with_tokenize": args.batch / (statistics.median(t_theta) + statistics.median(tok_t)),
        "tokens_per_doc": tokens_per_doc,
        "batch": args.batch,
        "lexical_key_weight": args.lexical_key_weight,
    }

    # 2. Overhead of memory at answer time.
    prompt = ["Question: which river flows through Basel and what is its length?\nAnswer:"]
    gen = GenerationConfig(max_new_tokens=16)
    k, d_m = modules.config.compressor.num_memory_tokens, modules.config.compressor.memory_dim
    question = torch.randn(1, k, d_m, device=device)
    memories = torch.randn(1, 4, k, d_m, device=device)
    mask = torch.ones(1, 4, dtype=torch.bool, device=device)
    never_eos = GenerationConfig(max_new_tokens=16)
    llm.eos_ids = set()  # always generate the full 16 tokens in both arms

    def bare():
        llm.generate(prompt, config=never_eos)

    def with_memory():
        with torch.inference_mode():
            prefix, has = modules.prefix(question, memories, mask)
        llm.generate(prompt, prefix, has, gen)

    def psi_pi_only():
        with torch.inference_mode():
            modules.prefix(question, memories, mask)

    def theta_question():
        compressor.compress([prompt[0]])

    t_bare = statistics.median(timed(bare, args.repeats, sync))
    t_mem = statistics.median(timed(with_memory, args.repeats, sync))
    t_psi_pi = statistics.median(timed(psi_pi_only, args.repeats, sync))
    t_q = statistics.median(timed(theta_question, args.repeats, sync))
    q_batch = compressor.tokenize(prompt)
    lexical = compressor.lexical_key

    def lexical_question():
        with torch.inference_mode():
            lexical(q_batch.input_ids.to(device), q_batch.attention_mask.to(device), q_batch.doc_index.to(device), 1)

    t_lex = statistics.median(timed(lexical_question, args.repeats, sync)) if lexical is not None else 0.0
    overhead = {
        "bare_generate_ms": 1e3 * t_bare,
        "generate_with_prefix_ms": 1e3 * t_mem,
        "psi_pi_ms": 1e3 * t_psi_pi,
        "overhead_pct": 100 * (t_mem - t_bare) / t_bare,
        "theta_question_ms": 1e3 * t_q,
        "lexical_key_question_ms": 1e3 * t_lex,
        "top_k": 4,
        "prefix_len": modules.config.aligner.prefix_len,
        "new_tokens": 16,
    }
    result = {"device": str(device), "torch_threads": torch.get_num_threads(), "theta": theta,
              "answer_overhead": overhead}
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / f"foundation-{device.type}.json"
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
