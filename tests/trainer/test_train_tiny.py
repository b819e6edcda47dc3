"""ONE tiny end-to-end training run: base LLM on the RC form, then Θ/ψ/π on a synthetic stream.

It must lower the QA loss and lift held-out EM above the same frozen LLM with no memory. The
setting (tiny GPT-2, one-word answers from a small shared pool, held-out entities) was checked
over several seeds; the test fails if memory stops carrying the facts.
"""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.models.checkpoint import load_checkpoint
from service.models.config import AggregatorConfig, AlignerConfig, CompressorConfig
from service.storage.redis_store import RedisMemoryStore
from tests.service.api.conftest import REDIS_URL, make_settings
from trainer.base_llm import BaseLLMConfig, load_base_llm, train_base_llm
from trainer.data import SyntheticConfig, examples, synthetic_stream
from trainer.evaluate import MAX_NEW_TOKENS, answer_prompts, evaluate_cmt, fit_prompt
from trainer.objectives import ObjectiveConfig
from trainer.scoring import aggregate
from trainer.service_eval import evaluate_service
from trainer.train import TrainConfig, train

STREAM = SyntheticConfig(seed=0, num_entities=400, kinds=("city", "product"), pool_size=8, fillers=0,
                         distractor_ratio=0.3, update_prob=0.0)


@pytest.mark.slow
def test_tiny_training_run_lowers_loss_and_beats_no_memory(tmp_path):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    stream = synthetic_stream(STREAM)
    train_base_llm(stream["train"], tmp_path / "llm", BaseLLMConfig(
        hidden_size=64, num_layers=2, num_heads=4, vocab_size=400, max_positions=128, steps=300, batch_size=32,
        lr=3e-3, warmup=10))
    llm = load_base_llm(tmp_path / "llm")
    config = TrainConfig(
        out=str(tmp_path / "cmt"), epochs=4, batch_size=16, lr=1e-3, warmup=10, distractors=4, ckpt_every=0,
        progress=False, valid_questions=60,
        compressor=CompressorConfig(num_memory_tokens=8, num_layers=2, num_heads=4, lexical_key_weight=0.5),
        aggregator=AggregatorConfig(top_k=1, max_docs=8, num_layers=1, num_heads=4),
        aligner=AlignerConfig(prefix_len=8, hidden_dim=128),
        objective=ObjectiveConfig(top_k=1, self_match_weight=0.1, contrastive_weight=0.1),
    )
    log = train(config, llm=llm, train_docs=stream["train"], valid_docs=stream["valid"])
    qa = [s["qa"] for s in log["steps"]]
    assert sum(qa[-10:]) / 10 < 0.7 * sum(qa[:10]) / 10, "training did not lower the QA loss"
    assert json.loads((tmp_path / "cmt" / "train_log.json").read_text())["valid"]

    modules, _ = load_checkpoint(tmp_path / "cmt" / "best", llm.identity, llm.layout)
    test = examples(stream["test"])
    # the key's lexical part started from the training texts' IDF: a word of every question weighs
    # less than the pieces of an (unseen) company name
    lexical, tok = modules.compressor.lexical_key, modules.compressor.tokenizer
    name_pieces = tok(stream["test"][0]["entity"], add_special_tokens=False)["input_ids"]
    assert lexical.weight[tok.convert_tokens_to_ids("which")] < lexical.weight[name_pieces].mean()
    cmt = evaluate_cmt(modules, llm, stream["test"], test, top_k=1)
    none, _ = answer_prompts(llm, [fit_prompt(llm, e.question, None) for e in test])
    none_em = aggregate(none, [e.answers for e in test])["em"]
    assert cmt["em"] >= none_em + 10, f"CMT EM {cmt['em']:.1f} is not above no-memory EM {none_em:.1f}"

    # The same checkpoint served over HTTP (real app, real Redis) answers as the offline evaluation does.
    settings = make_settings((tmp_path / "llm", tmp_path / "cmt" / "best"))
    try:
        with TestClient(create_app(settings)) as client:
            served = evaluate_service(client, stream["test"], test, concurrency=8, max_new_tokens=MAX_NEW_TOKENS)
    finally:
        RedisMemoryStore(REDIS_URL, bank=settings.bank).drop_bank()
    same = sum(a == b for a, b in zip(served["predictions"], cmt["predictions"], strict=True))
    # fp16 memories in Redis and other batch shapes may flip a rare near-tie, nothing more
    assert same >= 0.95 * len(test), f"only {same}/{len(test)} served answers match the offline pipeline"
    assert served["em"] >= none_em + 10
