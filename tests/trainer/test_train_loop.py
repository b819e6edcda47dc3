"""Training runs on tiny models: which validation is kept as best, what each step logs, which documents
are dropped (the settings and stream of test_train_resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import tiny_gpt2
from tests.trainer.test_train_resume import STREAM, _config
from trainer import train_loop
from trainer.data import synthetic_stream
from trainer.train import train


def test_with_zero_em_and_f1_the_lowest_valid_answer_loss_is_best(tmp_path, bpe_tokenizer):
    """A random tiny LLM answers nothing right (EM = F1 = 0 at every validation): the best checkpoint is the
    validation with the lowest answer loss, not the untrained start that the old (EM, recall@1) rule kept."""
    torch.set_num_threads(1)
    stream = synthetic_stream(STREAM)
    llm = tiny_gpt2(bpe_tokenizer)
    log = train(_config(tmp_path / "run", valid_questions=20, lr=3e-3, epochs=3), llm=llm, train_docs=stream["train"],
                valid_docs=stream["valid"])
    entries = log["valid"]
    assert [e["epoch"] for e in entries] == [-1, 0, 1, 2]
    assert all(e["em"] == 0 and e["f1"] == 0 for e in entries), "the scenario needs EM = F1 = 0 throughout"
    assert entries[0]["valid_loss"] == pytest.approx(math.log(len(bpe_tokenizer)), abs=0.5)  # untrained: ~ uniform
    lowest = min(entries, key=lambda e: e["valid_loss"])
    assert lowest["epoch"] >= 0, "training should lower the valid answer loss below the start's"
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["metrics"]["valid"]
    assert saved == lowest and saved["is_best"]
    assert log["best"]["key"] == [0.0, 0.0, -lowest["valid_loss"]] and log["best"]["step"] == lowest["step"]


def test_best_is_chosen_by_em_then_f1_then_lowest_loss(tmp_path, bpe_tokenizer, monkeypatch):
    """Scripted valid losses (EM = F1 = 0 from the real pass): the minimum in the middle of the run wins,
    neither the start nor the last state."""
    torch.set_num_threads(1)
    stream = synthetic_stream(STREAM)
    llm = tiny_gpt2(bpe_tokenizer)
    losses = iter([5.0, 4.0, 6.0, 3.0, 3.5])
    monkeypatch.setattr(train_loop, "valid_answer_loss", lambda run: (next(losses), 1))
    log = train(_config(tmp_path / "run", valid_questions=20, epochs=4), llm=llm, train_docs=stream["train"],
                valid_docs=stream["valid"])
    entries = log["valid"]
    assert [e["valid_loss"] for e in entries] == [5.0, 4.0, 6.0, 3.0, 3.5]
    assert all(e["em"] == 0 and e["f1"] == 0 for e in entries)
    assert [e["is_best"] for e in entries] == [True, True, False, True, False]
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["metrics"]
    assert saved["valid"]["epoch"] == 2 and saved["valid"]["step"] == entries[3]["step"]
    assert saved["train_config"]["objective"]["top_k"] == 1  # the nested config is recorded


def test_steps_log_llm_tokens_and_questions_per_second(tmp_path, bpe_tokenizer):
    torch.set_num_threads(1)
    stream = synthetic_stream(STREAM)
    llm = tiny_gpt2(bpe_tokenizer)
    config = _config(tmp_path / "run", max_steps=3)
    log = train(config, llm=llm, train_docs=stream["train"], valid_docs=[])
    for s in log["steps"]:
        assert s["seconds"] > 0 and s["tokens_per_s"] == pytest.approx(s["tokens"] / s["seconds"])
        assert s["examples_per_s"] * s["seconds"] == pytest.approx(config.batch_size)  # full batches of 8 questions
        # B x (padded prompt+answer ids) + B x p prefix positions: at least a question and an answer token each
        prompt_answer = s["tokens"] - config.batch_size * config.aligner.prefix_len
        assert prompt_answer % config.batch_size == 0 and prompt_answer // config.batch_size >= 4


def test_documents_the_compressor_refuses_are_dropped_with_their_questions(tmp_path, bpe_tokenizer):
    torch.set_num_threads(1)
    stream = synthetic_stream(STREAM)
    huge = {"doc_id": "huge", "title": "", "date": None, "text": "the river flows north " * 2000,
            "questions": [{"qid": "huge-q", "question": "Where does the river flow?", "answers": ["north"]}]}
    log = train(_config(tmp_path / "run", max_steps=1), llm=tiny_gpt2(bpe_tokenizer),
                train_docs=[huge, *stream["train"]], valid_docs=[])
    assert log["data"]["dropped_too_long"] == {"train": 1, "valid": 0}
    assert log["data"]["train"][0]["documents"] == len(stream["train"])


def test_init_from_starts_a_run_from_a_checkpoints_weights_with_other_aggregator_queries(tmp_path, bpe_tokenizer):
    from service.models.checkpoint import load_checkpoint
    from service.models.config import AggregatorConfig

    torch.set_num_threads(1)
    stream = synthetic_stream(STREAM)
    llm = tiny_gpt2(bpe_tokenizer)
    train(_config(tmp_path / "a", max_steps=2), llm=llm, train_docs=stream["train"], valid_docs=[])
    first = _config(tmp_path / "b", max_steps=1, lr=0.0, warmup=1, init_from=str(tmp_path / "a" / "last"))
    first.aggregator = AggregatorConfig(**{**vars(first.aggregator), "queries": "memories"})
    train(first, llm=llm, train_docs=stream["train"], valid_docs=[])
    a, _ = load_checkpoint(tmp_path / "a" / "last", llm.identity, llm.layout)
    b, config = load_checkpoint(tmp_path / "b" / "last", llm.identity, llm.layout)
    assert config["cmt"]["aggregator"]["queries"] == "memories"
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), f"{name} was not copied (lr 0 keeps it)"
    with pytest.raises(ValueError, match="init-from"):
        _config(tmp_path / "c", init_from=str(tmp_path / "a" / "last"), resume=True)


def test_train_only_leaves_every_other_parameter_at_its_start(tmp_path, bpe_tokenizer):
    from service.errors import InvalidInputError
    from service.models.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    stream = synthetic_stream(STREAM)
    llm = tiny_gpt2(bpe_tokenizer)
    train(_config(tmp_path / "a", max_steps=1, lr=0.0, warmup=1), llm=llm, train_docs=stream["train"], valid_docs=[])
    moved = _config(tmp_path / "b", max_steps=3, lr=1e-2, warmup=1, train_only="aligner.up_proj,aggregator.out_norm")
    train(moved, llm=llm, train_docs=stream["train"], valid_docs=[])
    start, _ = load_checkpoint(tmp_path / "a" / "last", llm.identity, llm.layout)
    after, _ = load_checkpoint(tmp_path / "b" / "last", llm.identity, llm.layout)
    changed = {n for (n, x), (_, y) in zip(start.state_dict().items(), after.state_dict().items(), strict=True)
               if not torch.equal(x, y)}
    assert changed and all(n.startswith(("aligner.up_proj", "aggregator.out_norm")) for n in changed), changed
    with pytest.raises(InvalidInputError, match="names no parameter"):
        train(_config(tmp_path / "c", max_steps=1, train_only="aligner.nothing"), llm=llm,
              train_docs=stream["train"], valid_docs=[])
