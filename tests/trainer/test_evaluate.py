"""The evaluation protocol and its report, run through the console command on real (tiny) models."""

from __future__ import annotations

import json

import torch

from trainer.data import SyntheticConfig, synthetic_stream, write_jsonl
from trainer.evaluate import _recall, bm25_top, irrelevant_pool, main

STREAM = SyntheticConfig(seed=2, num_entities=80, kinds=("city", "staff"), pool_size=6, fillers=0)


def test_bm25_ranks_the_document_sharing_the_rare_words_first():
    texts = ["The Rhine flows through Basel and Cologne.", "Paris is the capital of France.", "A king lived in a castle."]
    top = bm25_top(texts, ["Which cities does the Rhine pass?", "What is the capital of France?", "unknownword"], k=2)
    assert top.shape == (3, 2)
    assert top[0, 0] == 0 and top[1, 0] == 1
    assert _recall(top[:2], [0, 1], ks=(1, 2), ranked=True) == {"recall_at_1": 100.0, "recall_at_2": 100.0}
    assert _recall(top[:2], [2, 2], ks=(1,), ranked=True) == {"recall_at_1": 0.0}


def test_recall_from_scores_counts_the_gold_in_the_top_k():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]])
    assert _recall(scores, [0, 1], ks=(1, 2)) == {"recall_at_1": 50.0, "recall_at_2": 100.0}


def test_irrelevant_pool_holds_no_document_about_the_asked_entities():
    docs = synthetic_stream(STREAM)["train"]
    asked = [d for d in docs if d["questions"]][:20]
    pool = irrelevant_pool(docs, asked)
    entities = {d["entity"] for d in asked}
    assert pool and not any(d["entity"] in entities for d in pool)


def test_evaluation_command_writes_the_full_protocol_report(tmp_path, model_dirs):
    llm_dir, ckpt_dir = model_dirs
    docs = synthetic_stream(STREAM)["train"]
    write_jsonl(tmp_path / "stream-test.jsonl", docs)
    out = tmp_path / "report"
    assert main([
        "--llm", str(llm_dir), "--checkpoint", str(ckpt_dir), "--data", str(tmp_path / "stream-{split}.jsonl"),
        "--retention-docs", "10", "--robustness-questions", "10", "--max-questions", "40",
        "--ablation", f"same={ckpt_dir}", "--out", str(out),
    ]) == 0

    report = json.loads((out / "report.json").read_text())
    assert [r["row"] for r in report["rows"]] == [
        "no memory", "gold doc in prompt (RAG upper bound)", "retrieved top-1 doc in prompt (RAG, CMT keys)", "CMT",
        "CMT ablation: same",
    ]
    rows = {r["row"]: r for r in report["rows"]}
    assert report["questions"] == 40 and report["documents"] == len(docs)
    assert all(0 <= r["em"] <= r["f1"] <= 100 for r in report["rows"])
    assert rows["CMT ablation: same"]["em"] == rows["CMT"]["em"], "the same checkpoint must score the same"
    assert rows["gold doc in prompt (RAG upper bound)"]["prompt_tokens"] > rows["no memory"]["prompt_tokens"]
    assert rows["CMT"]["stored_bytes_per_doc"] == (4 * 384 + 384) * 2  # k=4 fp16 memories + fp16 key

    ret = report["retention"]
    first = ret["first_stream_docs"]
    sizes = [p["bank_docs"] for p in ret["curve"]]
    assert sizes == sorted({min(len(docs), m * first) for m in (1, 2, 5, 10)} | {len(docs)})
    assert ret["growth"] == len(docs) / first and ret["questions"] == 10

    shares = [p["irrelevant_share"] for p in report["robustness"]]
    assert shares == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(abs(p["actual_share"] - p["irrelevant_share"]) < 0.05 for p in report["robustness"])

    for method in ("cmt_keys", "minilm_mean_pooled_untrained", "bm25"):
        r = report["retrieval"][method]
        assert 0 <= r["recall_at_1"] <= r["recall_at_5"] <= 100
    assert report["retrieval"]["bm25"]["recall_at_5"] > 50, "entity names make BM25 find the gold document"
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "rows.png", "retention.png", "robustness.png"}
    assert "| CMT |" in (out / "report.md").read_text()
