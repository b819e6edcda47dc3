"""How to build the retrieval key: recall@1/5 of the gold paragraph for the packaged MiniLM's sentence
embedding, the lexical part (distinct word pieces at the SQuAD-train IDF), and the two side by side with
the lexical part hashed into a number of buckets and weighted (score = dense cosine + w · lexical cosine,
i.e. β = √w in CompressorConfig.lexical_key_weight), plus the lexical part unhashed (the ceiling of hashing).

    .venv/bin/python bench/bench_key_choice.py --dataset squad-train --split valid --questions 1000

Writes bench/results/key-choice-<dataset>-<split>.json. MiniLM over ~1,200 paragraphs takes 2-13 min on
these 2 CPU cores (how busy they are decides). The hashing is the one service.models.lexical_key uses.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from service.models.compressor import resolve_backbone
from service.models.config import DEFAULT_BACKBONE
from service.models.lexical_key import LexicalKey
from trainer.data import load_split

RESULTS = Path(__file__).resolve().parent / "results"


def sentence_embeddings(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """(N, d_s) mean-pooled, L2-normalised (sentence-transformers pooling)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            batch = texts[i : i + 32]
            enc = tokenizer(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            h = model(**enc).last_hidden_state  # (b, L, d_s)
            m = enc["attention_mask"][..., None].float()  # (b, L, 1)
            out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def lexical_vectors(tokenizer, texts: list[str], idf: torch.Tensor) -> torch.Tensor:
    """(N, V) each text's distinct tokens at their IDF, L2-normalised (the unhashed lexical part)."""
    special = set(tokenizer.all_special_ids)
    rows = torch.zeros(len(texts), len(idf))
    for r, ids in enumerate(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]):
        distinct = sorted(set(ids) - special)
        rows[r, distinct] = idf[distinct]
    return F.normalize(rows, dim=-1)


def hashed(vectors: torch.Tensor, buckets: int) -> torch.Tensor:
    """(N, V) → (N, buckets) with LexicalKey's bucket and sign of every token, L2-normalised."""
    key = LexicalKey(vectors.shape[1], buckets)
    spread = torch.zeros(vectors.shape[1], buckets)  # (V, buckets)
    spread[torch.arange(vectors.shape[1]), key.bucket] = key.sign
    return F.normalize(vectors @ spread, dim=-1)


def recall(scores: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    top = scores.topk(5, dim=1).indices  # (Q, 5)
    return {"recall_at_1": round(100 * (top[:, 0] == gold).float().mean().item(), 1),
            "recall_at_5": round(100 * (top == gold[:, None]).any(1).float().mean().item(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="squad-train")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--buckets", default="192,1664,4096")
    parser.add_argument("--weights", default="1.0,1.5,2.0")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    docs = load_split(args.dataset, args.split)
    texts = [d["text"] for d in docs]
    pairs = [(q["question"], i) for i, d in enumerate(docs) for q in d["questions"]][: args.questions]
    questions, gold = [q for q, _ in pairs], torch.tensor([i for _, i in pairs])
    path = resolve_backbone(DEFAULT_BACKBONE)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    start = time.perf_counter()
    dense = sentence_embeddings(model, tokenizer, questions, 64) @ sentence_embeddings(model, tokenizer, texts, 256).T
    embed_seconds = time.perf_counter() - start

    idf_docs = load_split("squad-train", "train")
    special = set(tokenizer.all_special_ids)
    df: Counter[int] = Counter()
    for ids in tokenizer(list({d["text"] for d in idf_docs}), add_special_tokens=False, verbose=False)["input_ids"]:
        df.update(set(ids) - special)
    n = len({d["text"] for d in idf_docs})
    idf = torch.tensor([math.log1p((n - df[t] + 0.5) / (df[t] + 0.5)) for t in range(len(tokenizer))])
    lex_q, lex_d = lexical_vectors(tokenizer, questions, idf), lexical_vectors(tokenizer, texts, idf)

    weights = [float(w) for w in args.weights.split(",")]
    rows = {"dense (MiniLM)": recall(dense, gold), "lexical, unhashed": recall(lex_q @ lex_d.T, gold)}
    for w in weights:
        rows[f"dense + {w} lexical, unhashed"] = recall(dense + w * (lex_q @ lex_d.T), gold)
    for b in (int(x) for x in args.buckets.split(",")):
        hq, hd = hashed(lex_q, b), hashed(lex_d, b)
        for w in weights:
            rows[f"dense + {w} lexical, {b} buckets"] = recall(dense + w * (hq @ hd.T), gold)
    out = {"dataset": args.dataset, "split": args.split, "documents": len(docs), "questions": len(questions),
           "idf": "squad-train train paragraphs", "embed_seconds": round(embed_seconds, 1), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    target = RESULTS / f"key-choice-{args.dataset}-{args.split}.json"
    target.write_text(json.dumps(out, indent=1))
    for name, r in rows.items():
        print(f"{name:40s} r@1 {r['recall_at_1']:5.1f} r@5 {r['recall_at_5']:5.1f}")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
