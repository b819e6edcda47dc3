"""End-to-end demo of the CMT pieces on this machine, no service yet: compress real SQuAD
paragraphs with the packaged MiniLM, select top-k for a question, align into a KV prefix and let a
(tiny, randomly initialised) frozen GPT-2 answer. It shows the plumbing and the memory sizes; the
answers are noise until a trained checkpoint exists."""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from service.models.cmt import Bank, CMTModules, CMTPipeline
from service.models.config import CMTConfig
from service.models.llm import GenerationConfig, HFCausalLM
from trainer.tokenizer import train_bpe_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad" / "test.jsonl.gz"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DATA, help="JSONL.gz of documents with questions")
    parser.add_argument("--docs", type=int, default=32, help="documents streamed into the bank")
    parser.add_argument("--questions", type=int, default=3)
    args = parser.parse_args(argv)

    with gzip.open(args.data, "rt") as fh:
        records = [json.loads(line) for _, line in zip(range(args.docs), fh)]
    texts = [r["text"] for r in records]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=2000)
    torch.manual_seed(0)
    llm = HFCausalLM(GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_layer=4, n_embd=256, n_head=4,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )), tokenizer, "demo-gpt2")
    config = CMTConfig()
    pipeline = CMTPipeline(CMTModules.build(config, llm.layout), llm)

    start = time.perf_counter()
    docs = pipeline.compress(texts)
    elapsed = time.perf_counter() - start
    bank = Bank(docs.memory, docs.key, torch.arange(float(len(texts))), [r["doc_id"] for r in records])
    fp16_bytes = docs.memory[0].numel() * 2
    print(f"compressed {len(texts)} documents in {elapsed:.2f}s ({len(texts) / elapsed:.1f} docs/s)")
    print(f"memory per document: {tuple(docs.memory.shape[1:])} = {fp16_bytes} bytes in fp16")
    for record in records[: args.questions]:
        question = record["questions"][0]["question"]
        answer = pipeline.answer([question], bank, generation=GenerationConfig(max_new_tokens=12))[0]
        hit = record["doc_id"] in answer.source_ids
        print(f"\nQ: {question}\nA: {answer.text!r}  (untrained modules)\nsources: {answer.source_ids} gold retrieved: {hit}")


if __name__ == "__main__":
    main()
