"""How to build the retrieval key: recall@1/5 of the gold paragraph for the packaged MiniLM's sentence
embedding, the lexical part (distinct word pieces at the SQuAD-train IDF), and the two side by side with
the lexical part hashed into a number of buckets and weighted (score = dense cosine + w · lexical cosine,
i.e. β = √w in CompressorConfig.lexical_key_weight), plus the lexical part unhashed (the ceiling of hashing).

    .venv/bin/python bench/bench_key_choice.py --dataset squad-train --split valid --questions 1000

Writes bench/results/key-choice-<dataset>-<split>.json. MiniLM over ~1,200 paragraphs takes 2-13 min on
these 2 CPU cores (how busy they are decides). Both parts are computed by the service's own code
(service.models.key_encoder, service.models.lexical_key), only the weighting and bucket count vary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from service.models.compressor import resolve_backbone
from service.models.config import DEFAULT_BACKBONE
from service.models.key_encoder import KeyEncoder
from service.models.lexical_key import LexicalKey
from trainer.data import load_split
from trainer.eval_retrieval import _recall, write_recall_report

RESULTS = Path(__file__).resolve().parent / "results"


def dense_part(encoder: KeyEncoder, texts: list[str], batch: int = 32) -> torch.Tensor:
    """(N, d_s) the key encoder's part of the key, in batches."""
    with torch.inference_mode():
        return torch.cat([encoder(encoder.tokenize(texts[i : i + batch])) for i in range(0, len(texts), batch)])


def lexical_part(encoder: KeyEncoder, lexical: LexicalKey, texts: list[str], batch: int = 256) -> torch.Tensor:
    """(N, buckets) the lexical part of the key, as Θ computes it over the key encoder's windows."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            w = encoder.tokenize(texts[i : i + batch])
            out.append(lexical(w.input_ids, w.attention_mask, w.text_index, w.num_texts))
    return torch.cat(out)


def unhashed(encoder: KeyEncoder, idf: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """(N, V) each text's distinct tokens at their IDF, L2-normalised: the lexical part without hashing."""
    special = set(encoder.tokenizer.all_special_ids)
    rows = torch.zeros(len(texts), len(idf))
    for r, ids in enumerate(encoder.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]):
        distinct = sorted(set(ids) - special)
        rows[r, distinct] = idf[distinct]
    return F.normalize(rows, dim=-1)


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
    questions, gold = [q for q, _ in pairs], [i for _, i in pairs]
    encoder = KeyEncoder.load(resolve_backbone(DEFAULT_BACKBONE))
    start = time.perf_counter()
    dense = dense_part(encoder, questions) @ dense_part(encoder, texts).T  # (Q, N)
    embed_seconds = time.perf_counter() - start

    tokenizer = encoder.tokenizer
    idf_texts = sorted({d["text"] for d in load_split("squad-train", "train")})
    idf_ids = tokenizer(idf_texts, add_special_tokens=False, verbose=False)["input_ids"]
    fitted = LexicalKey(len(tokenizer), 1, tokenizer.all_special_ids)
    fitted.fit_idf(idf_ids)
    exact = unhashed(encoder, fitted.weight.detach(), questions) @ unhashed(encoder, fitted.weight.detach(), texts).T

    weights = [float(w) for w in args.weights.split(",")]
    rows = {"dense (MiniLM)": _recall(dense, gold), "lexical, unhashed": _recall(exact, gold)}
    for w in weights:
        rows[f"dense + {w} lexical, unhashed"] = _recall(dense + w * exact, gold)
    for b in (int(x) for x in args.buckets.split(",")):
        lexical = LexicalKey(len(tokenizer), b, tokenizer.all_special_ids)
        lexical.load_state_dict(fitted.state_dict())
        hashed = lexical_part(encoder, lexical, questions) @ lexical_part(encoder, lexical, texts).T  # (Q, N)
        for w in weights:
            rows[f"dense + {w} lexical, {b} buckets"] = _recall(dense + w * hashed, gold)
    header = {"dataset": args.dataset, "split": args.split, "documents": len(docs), "questions": len(questions),
              "idf": "squad-train train paragraphs", "embed_seconds": round(embed_seconds, 1)}
    write_recall_report(RESULTS / f"key-choice-{args.dataset}-{args.split}.json", header, rows)


if __name__ == "__main__":
    main()
