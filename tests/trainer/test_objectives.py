from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_llama
from trainer.objectives import ObjectiveConfig, QABatch, qa_objective, self_matching_loss


def _batch(paragraphs):
    return QABatch(
        documents=paragraphs[:3],
        questions=["What is the first paragraph about?", "Which place is named?", "Who is mentioned?"],
        answers=["a river", "Basel", "a king"],
        timestamps=torch.tensor([1.0, 2.0, 3.0]),
        distractors=paragraphs[3:5],
    )


def test_one_optimizer_step_changes_theta_psi_pi_and_leaves_every_llm_parameter_bit_identical(
    make_modules, bpe_tokenizer, paragraphs
):
    llm = tiny_llama(bpe_tokenizer)
    modules = make_modules(llm)
    llm_before = {n: p.detach().clone() for n, p in llm.model.named_parameters()}
    trainable = {n: p for n, p in modules.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    assert not any(n.startswith("compressor.backbone.") for n in trainable), "frozen backbone by default"

    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    terms = qa_objective(modules, llm, _batch(paragraphs), ObjectiveConfig(top_k=2, alpha=0.5))
    terms.total.backward()
    optimizer.step()

    for part in ("compressor.", "aggregator.", "aligner."):
        changed = [n for n in trainable if n.startswith(part) and not torch.equal(before[n], trainable[n])]
        assert changed, f"no parameter of {part[:-1]} changed"
    for name, param in llm.model.named_parameters():
        assert torch.equal(param, llm_before[name]), f"LLM parameter {name} changed"
        assert param.grad is None


def test_loss_terms_are_finite_and_whole_bank_ablation_runs(make_modules, bpe_tokenizer, paragraphs):
    llm = tiny_llama(bpe_tokenizer)
    modules = make_modules(llm)
    terms = qa_objective(modules, llm, _batch(paragraphs), ObjectiveConfig(use_top_k=False, self_match_weight=0.0))
    assert torch.isfinite(terms.total) and torch.equal(terms.total, terms.qa)
    assert 0.0 <= terms.retrieval_hits <= 1.0


def test_self_matching_rewards_matching_keys_and_separated_documents():
    keys = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    aligned = self_matching_loss(keys, keys, lam=0.1)
    shuffled = self_matching_loss(keys, keys.roll(1, dims=0), lam=0.1)
    assert aligned < shuffled
    collapsed = torch.nn.functional.normalize(torch.ones(4, 16), dim=-1)
    assert self_matching_loss(collapsed, collapsed, lam=1.0) > self_matching_loss(keys, keys, lam=1.0)


def test_distillation_loss_is_zero_for_the_teacher_itself_and_positive_otherwise(llm):
    from trainer.objectives import answer_targets, distillation_loss, teacher_targets

    questions, docs, answers = ["Who?", "When did it open?"], ["Ann built it.", "It opened in 1990."], ["Ann", "1990"]
    t_ids, t_mask, t_labels = teacher_targets(llm, questions, docs, answers)
    s_ids, s_mask, s_labels = answer_targets(llm, questions, answers)
    assert (t_labels != -100).sum() == (s_labels != -100).sum(), "both rows label the same answer tokens"
    with torch.no_grad():
        teacher = llm.forward_logits(t_ids, t_mask)
        student = llm.forward_logits(s_ids, s_mask)
    assert distillation_loss(teacher, t_labels, teacher, t_labels).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(student, s_labels, teacher, t_labels).item() > 1e-4


def test_reconstruction_rows_label_only_the_window_after_the_cue(bpe_tokenizer):
    from trainer.objectives import reconstruction_rows

    llm = tiny_llama(bpe_tokenizer)
    text = " ".join(f"word{i}" for i in range(80))
    ids = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
    rows, mask, labels = reconstruction_rows(llm, [text, "short text"], [1.0, 0.5], cue=4, length=10)
    window = ids[len(ids) - 14 :]  # start 1.0 = the last window that fits
    assert rows[0].tolist() == window and mask[0].all()
    assert labels[0].tolist() == [-100] * 4 + window[4:]
    short = bpe_tokenizer("short text", add_special_tokens=False)["input_ids"]
    assert rows[1, -len(short):].tolist() == short and int(mask[1].sum()) == len(short)
    assert (labels[1] != -100).sum() == max(0, len(short) - 4)


def test_reconstruction_loss_trains_theta_psi_pi_from_the_document_alone(make_modules, bpe_tokenizer, paragraphs):
    llm = tiny_llama(bpe_tokenizer)
    modules = make_modules(llm)
    batch = _batch(paragraphs)
    batch.window_starts = [0.0, 0.5, 1.0]
    terms = qa_objective(modules, llm, batch, ObjectiveConfig(top_k=2, self_match_weight=0.0, reconstruct_weight=1.0))
    assert terms.reconstruct is not None and torch.isfinite(terms.reconstruct)
    assert torch.allclose(terms.total, terms.qa + terms.reconstruct)
    modules.zero_grad()
    terms.reconstruct.backward()
    for param in (modules.compressor.soft_tokens, modules.aligner.up_proj.weight):  # Θ and π both learn from it
        assert param.grad is not None and param.grad.abs().sum() > 0
    with pytest.raises(Exception, match="reconstruct_tokens"):
        ObjectiveConfig(reconstruct_tokens=0)


def test_training_reads_the_slots_each_question_chooses_as_serving_does(minilm, bpe_tokenizer, paragraphs):
    from service.models.cmt import CMTModules
    from service.models.config import AggregatorConfig, AlignerConfig, CMTConfig, CompressorConfig
    from tests.conftest import minilm_compressor

    llm = tiny_llama(bpe_tokenizer)
    torch.manual_seed(0)
    config = CMTConfig(
        compressor=CompressorConfig(num_memory_tokens=12, num_layers=1, num_heads=4, memory_values="token_embeddings",
                                    stored_picks=2, lexical_key_weight=0.5),
        aggregator=AggregatorConfig(top_k=2, max_docs=8, num_layers=1, num_heads=4, queries="memories",
                                    select_slots=4),
        aligner=AlignerConfig(prefix_len=4, hidden_dim=64),
    )
    modules = CMTModules(config, minilm_compressor(config.compressor, minilm), llm.layout)
    modules.compressor.fit_lexical_idf(paragraphs)
    batch = _batch(paragraphs)
    batch.window_starts = [0.0, 0.5, 1.0]
    terms = qa_objective(modules, llm, batch, ObjectiveConfig(top_k=2, reconstruct_weight=1.0))
    assert torch.isfinite(terms.total) and terms.reconstruct is not None
    terms.total.backward()  # the chosen slots' pick weights carry the gradient to the pool's salience
    assert modules.compressor.token_pool.token_salience.grad.abs().sum() > 0
