"""The evaluation protocol and its report, run through the console command on real (tiny) models."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from service.models.prompts import get_profile
from trainer.data import SyntheticConfig, synthetic_stream, write_jsonl
from trainer.eval_answer import prompt_text
from trainer.evaluate import _recall, bm25_top, irrelevant_pool, main

STREAM = SyntheticConfig(seed=2, num_entities=80, kinds=("city", "staff"), pool_size=6, fillers=0)


def test_bm25_ranks_the_document_sharing_the_rare_words_first():
    texts = ["The Rhine flows through Basel and Cologne.", "Paris is the capital of France.",
             "A king lived in a castle."]
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
    argv = [
        "--llm", str(llm_dir), "--checkpoint", str(ckpt_dir), "--data", str(tmp_path / "stream-{split}.jsonl"),
        "--retention-docs", "10", "--robustness-questions", "10", "--max-questions", "40", "--batch-size", "16",
        "--timing-questions", "20",
        "--ablation", f"same={ckpt_dir}", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
    ]
    assert main(argv) == 0

    report = json.loads((out / "report.json").read_text())
    n = len(docs)
    assert [r["row"] for r in report["rows"]] == [
        "no memory", "gold paragraph in prompt (ceiling)", "RAG top-1 by BM25", "RAG top-3 by BM25",
        "RAG top-1 by CMT keys", "RAG top-3 by CMT keys", "CMT (top-3)",
        f"CMT over the 8 best of {n} docs by key (MAC-style, capped)", "CMT ablation: same",
    ]
    rows = {r["row"]: r for r in report["rows"]}
    assert report["questions"] == 40 and report["documents"] == n
    assert report["batch_size"] == 16 and report["prompt_profile"] == report["checkpoint_prompt_profile"] == "plain"
    assert report["timing_questions"] == 32, "rounded up to whole batches"
    for r in report["rows"]:
        assert 0 <= r["em"] <= r["f1"] <= 100 and r["em"] <= r["containment"] <= 100, r["row"]
        assert r["answer_words"] >= 0 and r["seconds_per_question"] > 0 and r["n"] == 40, r["row"]
        # the timing pass answers the first 32 questions again; CMT in the same batches, prompt-only rows unsorted
        assert r["timing_sample_same_answers"] >= (100 if r["family"] in ("cmt", "ablation") else 90), r["row"]
    assert rows["CMT ablation: same"]["em"] == rows["CMT (top-3)"]["em"], "the same checkpoint must score the same"
    gold, top1, top3 = (rows[k]["prompt_tokens"]
                        for k in ("gold paragraph in prompt (ceiling)", "RAG top-1 by BM25", "RAG top-3 by BM25"))
    assert gold > rows["no memory"]["prompt_tokens"] and top3 > top1
    assert rows["no memory"]["documents_cut"] == 0 and all(0 <= r.get("documents_cut", 0) <= 40 for r in report["rows"])
    assert rows["CMT (top-3)"]["stored_bytes_per_doc"] == (4 * 384 + 384) * 2  # k=4 fp16 memories + fp16 key
    assert (rows["RAG top-1 by CMT keys"]["stored_bytes_per_doc"]
            == rows["RAG top-1 by BM25"]["stored_bytes_per_doc"] + 384 * 2)
    assert rows[f"CMT over the 8 best of {n} docs by key (MAC-style, capped)"]["note"].startswith(
        "ψ holds at most max_docs=8")

    ret = report["retention"]
    first = ret["first_stream_docs"]
    sizes = [p["bank_docs"] for p in ret["curve"]]
    assert sizes == sorted({min(n, m * first) for m in (1, 2, 5, 10)} | {n})
    assert ret["growth"] == n / first and ret["questions"] == 10

    shares = [p["irrelevant_share"] for p in report["robustness"]]
    assert shares == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(abs(p["actual_share"] - p["irrelevant_share"]) < 0.05 for p in report["robustness"])

    for method in ("cmt_keys", "theta_backbone_mean_pooled_untrained", "bm25"):
        r = report["retrieval"][method]
        assert 0 <= r["recall_at_1"] <= r["recall_at_5"] <= 100
    assert report["retrieval"]["bm25"]["recall_at_5"] > 50, "entity names make BM25 find the gold document"
    assert {p.name for p in out.iterdir()} >= {
        "report.json", "report.md", "rows.png", "retention.png", "robustness.png"}
    md = (out / "report.md").read_text()
    assert "| CMT (top-3) |" in md and "| contains | words |" in md
    assert shlex.join(argv) in md, "the report names the command that produced it"
    assert report["cache"]["misses"] > 0 and (tmp_path / "cache" / "predictions.sqlite").is_file()


def test_rag_prompts_fit_the_llm_by_cutting_the_last_documents_first(llm):
    profile = get_profile("plain")
    long_doc = " ".join(f"word{i} filler text about the river" for i in range(200))
    first = "The Rhine flows through Basel."
    text = prompt_text(llm, profile, "Where does the Rhine flow?", [first, long_doc, long_doc], max_new_tokens=16)
    limit = llm.layout.max_positions - 16 - 2
    assert len(llm.tokenizer(text)["input_ids"]) <= limit
    assert text.startswith("Document: " + first) and text.endswith("Question: Where does the Rhine flow?\nAnswer:")
    assert prompt_text(llm, profile, "Q?", [first]) == profile.context_text(llm.tokenizer, "Q?", [first]), \
        "short prompts are untouched"
    assert prompt_text(llm, profile, "Q?") == profile.question_text(llm.tokenizer, "Q?")


def test_whole_bank_ablation_is_recognised_in_nested_and_flat_train_configs():
    from trainer.eval_rows import trained_with_top_k

    assert trained_with_top_k({"objective": {"use_top_k": False}}) is False
    assert trained_with_top_k({"use_top_k": False}) is False
    assert trained_with_top_k({"objective": {"use_top_k": True}}) is True and trained_with_top_k({}) is True


def test_rows_option_runs_only_the_named_groups(tmp_path, model_dirs):
    llm_dir, ckpt_dir = model_dirs
    write_jsonl(tmp_path / "stream-test.jsonl", synthetic_stream(STREAM)["train"])
    common = ["--llm", str(llm_dir), "--checkpoint", str(ckpt_dir), "--data", str(tmp_path / "stream-{split}.jsonl"),
              "--retention-docs", "0", "--robustness-questions", "0", "--max-questions", "8", "--no-cache"]
    assert main([*common, "--rows", "cmt", "--out", str(tmp_path / "r")]) == 0
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert {r["family"] for r in rows} == {"cmt"} and len(rows) == 2  # CMT top-k and CMT over the bank
    with pytest.raises(ValueError, match="unknown row groups"):
        main([*common, "--rows", "cmt,gold", "--out", str(tmp_path / "bad")])
