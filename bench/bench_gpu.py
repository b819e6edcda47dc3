"""Issue 14's GPU figures in one run: Θ ingest through the service's own path against Θ's raw forward and
the FLOP ceiling, the decode loop's time per token against the HBM limit, and CMT against RAG on a
7B-shaped LLM. A benchmark, not a test.

    python bench/bench_gpu.py --device cuda      # every section → bench/results/gpu-<device name>.json
    python bench/bench_gpu.py --smoke            # tiny shapes on the CPU in ~1 min: checks the script itself

Sections (--sections ingest,decode,rag):
- ingest: 256-token documents (the SQuAD test stream cut into 256 MiniLM tokens), Θ of the default config
  (MiniLM backbone, untrained heads). Documents/s of: the tokenizer alone; Θ's raw forward on batches already
  tokenized and on the device (fp32, bf16 autocast); `Engine.compress` (tokenize, forward, copy back) in fp32
  and in bf16 (Settings.compress_dtype); the ingest batcher POST /documents runs, which pipelines tokenization
  (its own thread) with the forward, in bf16; the backbone's FLOP ceiling at --peak-tflops. bf16 against
  fp32 on the service path: key cosine, memory relative error. Targets: the batcher in bf16 ≥ 10,000 docs/s
  and ≥ half the raw bf16 forward; key cosine ≥ 0.999.
- decode: random bf16 Llamas shaped like SmolLM2-135M and Llama-2-7B; time per token at batch 1 of
  `HFCausalLM.generate` and of the continuous decoder (the /ask path) with each store: growing tensors,
  the slab run eagerly, the slab replaying CUDA graphs (the service's default on CUDA), against the HBM
  limit (weight bytes / --hbm-tbps). Targets: ≤ 6 ms (7B), < 3 ms (SmolLM2).
- rag: the 7B shape, 32 questions, 16 new tokens: CMT (a 16-position KV prefix per question: ψ's one M* of
  the top-4) against RAG (three SQuAD paragraphs in the prompt) and the bare question: time to first token
  and total, one batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import gzip
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from service.models.cmt import CMTModules
from service.models.config import CMTConfig
from service.models.continuous import ContinuousDecoder
from service.models.llm import GenerationConfig, HFCausalLM
from service.models.prefix import KVLayout, KVPrefix
from service.runtime.engine import Engine
from service.runtime.ingest import make_compress_batcher
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "squad" / "test.jsonl.gz"
DOC_TOKENS = 256
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}
SMOKE_SHAPES = {"tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=30522, max_position_embeddings=2048)}
PREFIX_LEN = 16


REPEAT = 3
"""Timed calls per figure (after one warm-up); --smoke makes it 1."""


def timed(fn: Callable[[], object], device: torch.device, repeat: int | None = None) -> float:
    """Best wall seconds of `repeat` (default REPEAT) calls after one warm-up, the device synchronised around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(REPEAT if repeat is None else repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def squad() -> list[dict]:
    with gzip.open(SQUAD, "rt") as fh:
        return [json.loads(line) for line in fh]


def documents(tokenizer, n: int) -> list[str]:
    """n texts of DOC_TOKENS backbone tokens each (special tokens included), cut from the SQuAD test stream."""
    ids = tokenizer(" ".join(d["text"] for d in squad()), add_special_tokens=False, verbose=False)["input_ids"]
    size = DOC_TOKENS - 2
    windows = [ids[i : i + size] for i in range(0, len(ids) - size, size)]
    return [tokenizer.decode(windows[i % len(windows)]) for i in range(n)]


# ---- ingest --------------------------------------------------------------------------------------


def ingest(device: torch.device, n_docs: int, batch: int, peak_tflops: float) -> dict:
    modules = CMTModules.build(CMTConfig(), KVLayout(2, 2, 16, None)).to(device).eval()  # π unused here
    engine = Engine(None, modules, "bench", Path("."), 0.0)  # compress reads Θ only
    theta = modules.compressor
    docs = documents(theta.tokenizer, n_docs)
    batches = [docs[i : i + batch] for i in range(0, n_docs, batch)]
    tokenized = [theta.tokenize(b).to(device) for b in batches]

    def raw(dtype: torch.dtype) -> None:
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            for b in tokenized:
                theta(b)

    def service(dtype: torch.dtype) -> list:
        engine.compress_dtype = dtype
        return [engine.compress(b) for b in batches]

    rates = {"tokenizer_alone": n_docs / timed(lambda: [theta.tokenize(b) for b in batches], device)}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates[f"raw_forward_{name}"] = n_docs / timed(lambda dtype=dtype: raw(dtype), device)
        rates[f"service_path_{name}"] = n_docs / timed(lambda dtype=dtype: service(dtype), device)
    engine.compress_dtype = torch.bfloat16
    rates["batcher_pipelined_bf16"] = n_docs / timed(lambda: asyncio.run(through_batcher(engine, batches)), device)
    a, b = service(torch.float32)[0], service(torch.bfloat16)[0]
    rel = (a.memory.float() - b.memory.float()).norm(dim=-1) / a.memory.float().norm(dim=-1)  # (B, k)
    backbone = theta.backbone
    P = sum(p.numel() for n, p in backbone.named_parameters() if "embeddings" not in n)
    layers, width = backbone.config.num_hidden_layers, backbone.config.hidden_size
    flops = 2 * P * DOC_TOKENS + 4 * layers * DOC_TOKENS**2 * width  # matmuls + attention scores and mix, per doc
    rates["backbone_flop_ceiling"] = peak_tflops * 1e12 / flops
    out = {
        "documents": n_docs, "batch": batch, "doc_tokens": DOC_TOKENS, "docs_per_s": rates,
        "bf16_vs_fp32": {
            "key_cosine_min": float(F.cosine_similarity(a.key.float(), b.key.float(), dim=-1).min()),
            "memory_rel_error_max": float(rel.max()), "memory_rel_error_mean": float(rel.mean()),
        },
    }
    out["targets"] = {
        "service_bf16_at_least_10000_docs_per_s": rates["batcher_pipelined_bf16"] >= 10_000,
        "service_bf16_at_least_half_raw_bf16": rates["batcher_pipelined_bf16"] >= 0.5 * rates["raw_forward_bf16"],
        "key_cosine_at_least_0.999": out["bf16_vs_fp32"]["key_cosine_min"] >= 0.999,
    }
    return out


async def through_batcher(engine: Engine, batches: list[list[str]]) -> None:
    """Every batch submitted at once to the ingest batcher (as concurrent POST /documents would), awaited."""
    n = sum(len(b) for b in batches)
    settings = Settings(ingest_batch_size=len(batches[0]), batch_wait_ms=0, max_queue=n)
    batcher = make_compress_batcher(engine, settings)
    batcher.start()
    await asyncio.gather(*(batcher.submit(b) for b in batches))
    await batcher.close()


# ---- decode and CMT vs RAG -----------------------------------------------------------------------


def random_llm(shape: dict, device: torch.device, tokenizer) -> HFCausalLM:
    """A randomly initialised Llama of `shape` in bf16 on `device`; it never stops early (no EOS)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LlamaForCausalLM(LlamaConfig(**shape, pad_token_id=tokenizer.pad_token_id))
    finally:
        torch.set_default_dtype(default)
    llm = HFCausalLM(model, tokenizer, "random-llama")
    llm.eos_ids = set()  # every row decodes all its tokens: the timing is per token
    return llm


def decode(device: torch.device, shapes: dict, tokenizer, new_tokens: int, hbm_tbps: float) -> dict:
    prompt = "Question: What happened to the bridge in the report?\nAnswer:"
    out = {}
    for name, shape in shapes.items():
        llm = random_llm(shape, device, tokenizer)
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())

        def generate(n: int, llm: HFCausalLM = llm) -> None:
            llm.generate([prompt], None, None, GenerationConfig(max_new_tokens=n))

        # the service's decoders, kept across calls as the service keeps its one: a slab's graphs are
        # captured in the warm-up call (one per row bucket), later calls replay them
        decoders = {
            "continuous": ContinuousDecoder(llm, max_rows=4),
            "continuous_slab": ContinuousDecoder(llm, max_rows=4, store="slab", slab_columns=256),
            "continuous_slab_cuda_graphs": ContinuousDecoder(llm, max_rows=4, store="slab", slab_columns=256,
                                                             cuda_graphs=True),
        }

        def continuous(n: int, decoder: ContinuousDecoder) -> None:
            decoder.add(prompt, None, GenerationConfig(max_new_tokens=n))
            while decoder.active:
                decoder.step()

        paths = {"generate": generate} | {
            name: (lambda n, d=d: continuous(n, d)) for name, d in decoders.items()
        }
        per_token = {}
        for path, fn in paths.items():
            # a difference of two timings: best of at least 3 each, so one stall cannot make it negative
            first = timed(lambda fn=fn: fn(1), device, max(REPEAT, 3))
            full = timed(lambda fn=fn: fn(new_tokens + 1), device, max(REPEAT, 3))
            per_token[path] = 1e3 * (full - first) / new_tokens
        limit = 1e3 * weight_bytes / (hbm_tbps * 1e12)
        out[name] = {"parameters": sum(p.numel() for p in llm.model.parameters()), "weight_bytes": weight_bytes,
                     "ms_per_token_batch_1": per_token, "hbm_limit_ms_per_token": limit,
                     "ratio_to_hbm_limit": {k: v / limit for k, v in per_token.items()},
                     "cuda_graphs_captured": sorted(
                         b for b, g in decoders["continuous_slab_cuda_graphs"]._store._graphs.items() if g is not None)}
        del llm, decoders
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def cmt_vs_rag(device: torch.device, shape: dict, tokenizer, questions: int, new_tokens: int) -> dict:
    llm = random_llm(shape, device, tokenizer)
    docs = squad()
    asked = [(d, q["question"]) for d in docs for q in d["questions"]][:questions]
    by_id = {d["doc_id"]: i for i, d in enumerate(docs)}
    rag = []
    for d, q in asked:  # the gold paragraph and the next two of the stream: three paragraphs, as top-3 would be
        i = by_id[d["doc_id"]]
        context = "\n".join(docs[(i + j) % len(docs)]["text"] for j in range(3))
        rag.append(f"Document: {context}\nQuestion: {q}\nAnswer:")
    bare = [f"Question: {q}\nAnswer:" for _, q in asked]
    L = llm.layout
    g = torch.Generator(device="cpu").manual_seed(0)
    shape_kv = (len(bare), L.num_kv_heads, PREFIX_LEN, L.head_dim)
    prefix = KVPrefix([torch.randn(shape_kv, generator=g).to(device, torch.bfloat16) for _ in range(L.num_layers)],
                      [torch.randn(shape_kv, generator=g).to(device, torch.bfloat16) for _ in range(L.num_layers)])
    rows = {"cmt": (bare, prefix), "rag_top3": (rag, None), "bare": (bare, None)}
    out = {"questions": len(bare), "new_tokens": new_tokens, "prefix_positions": PREFIX_LEN,
           "rag_prompt_tokens_mean": sum(len(llm.tokenizer(p)["input_ids"]) for p in rag) / len(rag)}
    for name, (prompts, pre) in rows.items():
        def run(n: int, prompts: list[str] = prompts, pre: KVPrefix | None = pre) -> None:
            llm.generate(prompts, pre, None, GenerationConfig(max_new_tokens=n))
        repeat = max(REPEAT, 3)  # two timings compared with each other: one stall must not invert them
        out[name] = {"time_to_first_token_ms": 1e3 * timed(lambda run=run: run(1), device, repeat),
                     "total_ms": 1e3 * timed(lambda run=run: run(new_tokens), device, repeat)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", default="ingest,decode,rag")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and counts (checks the script on a CPU)")
    parser.add_argument("--ingest-docs", type=int, default=8192)
    parser.add_argument("--ingest-batch", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64, help="decode section: tokens timed per run")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--hbm-tbps", type=float, default=4.8, help="memory bandwidth (H200: 4.8, H100 SXM: 3.35)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    global REPEAT
    REPEAT = 1 if args.smoke else REPEAT
    device = torch.device(args.device)
    sections = args.sections.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                    "smoke": args.smoke}
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if "ingest" in sections:
        n, b = (32, 16) if args.smoke else (args.ingest_docs, args.ingest_batch)
        result["ingest"] = ingest(device, n, b, args.peak_tflops)
        print("ingest", json.dumps(result["ingest"]), flush=True)  # noqa: T201
    tokenizer = None
    if "decode" in sections or "rag" in sections:
        from transformers import AutoTokenizer

        from service.models.compressor import resolve_backbone
        from service.models.config import DEFAULT_BACKBONE

        tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(DEFAULT_BACKBONE))  # ids < every shape's vocab
    if "decode" in sections:
        result["decode"] = decode(device, shapes, tokenizer, 16 if args.smoke else args.new_tokens, args.hbm_tbps)
        print("decode", json.dumps(result["decode"]), flush=True)  # noqa: T201
    if "rag" in sections:
        shape = shapes["tiny-llama" if args.smoke else "llama-2-7b"]
        result["rag"] = cmt_vs_rag(device, shape, tokenizer, 4 if args.smoke else 32, 16)
        print("rag", json.dumps(result["rag"]), flush=True)  # noqa: T201
    out = args.out or ROOT / "bench" / "results" / f"gpu-{name.lower().replace(' ', '-')}.json"
    out.write_text(json.dumps(result, indent=2))
    print("wrote", out)  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
