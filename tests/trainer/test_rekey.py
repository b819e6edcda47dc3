from __future__ import annotations

import json

import pytest
import torch

from service.models.checkpoint import checkpoint_profile, load_checkpoint, save_checkpoint
from service.models.config import DEFAULT_BACKBONE
from service.models.prompts import PROFILES
from tests.conftest import tiny_llama
from trainer.rekey import rekey


def test_rekey_changes_only_the_retrieval_key_and_keeps_the_trained_memory_path(
    make_modules, bpe_tokenizer, paragraphs, tmp_path
):
    llm = tiny_llama(bpe_tokenizer)
    modules = make_modules(llm, seed=3, lexical_key_weight=0.5)
    modules.compressor.fit_lexical_idf(paragraphs)
    save_checkpoint(tmp_path / "trained", modules, llm.identity, {"alpha": 0.0},
                    prompt_profile=PROFILES["fewshot-context"])
    (tmp_path / "trained" / "train_log.json").write_text(json.dumps({"steps": [1]}))

    out = rekey(tmp_path / "trained", tmp_path / "rekeyed", llm, paragraphs[:50], dtype=torch.float32,
                key_encoder=DEFAULT_BACKBONE, key_dim=1024, lexical_key_weight=1.2)
    new, config = load_checkpoint(out, llm.identity, llm.layout)
    old, old_config = load_checkpoint(tmp_path / "trained", llm.identity, llm.layout)
    assert config["metrics"]["rekeyed_from"] == old_config["compressor_version"] != config["compressor_version"]
    assert checkpoint_profile(config).name == "fewshot-context"
    assert json.loads((out / "train_log.json").read_text()) == {"steps": [1]}

    texts = paragraphs[:3] + ["Which river flows through Basel?"]
    a, b = old.compressor.compress(texts), new.compressor.compress(texts)
    assert torch.equal(a.memory, b.memory), "the memory path must be the trained one"
    assert a.key.shape == (4, 384) and b.key.shape == (4, 1024)
    for part in ("aggregator", "aligner"):
        for (name, x), y in zip(getattr(old, part).state_dict().items(), getattr(new, part).state_dict().values(),
                                strict=True):
            assert torch.equal(x, y), name
    assert new.compressor.lexical_key.weight.shape == (len(new.compressor.key_encoder.tokenizer),)


def _trained_token_pool(make_modules, llm, paragraphs, **fields):
    """A token-pool Θ whose salience was moved off its IDF start, as training does."""
    modules = make_modules(llm, seed=5, memory_values="token_embeddings", lexical_key_weight=0.5, **fields)
    modules.compressor.fit_lexical_idf(paragraphs)
    with torch.no_grad():
        salience = modules.compressor.token_pool.token_salience
        salience.add_(torch.randn_like(salience))
    return modules


def test_rekey_keeps_the_token_pools_trained_salience(make_modules, bpe_tokenizer, paragraphs, tmp_path):
    llm = tiny_llama(bpe_tokenizer)
    modules = _trained_token_pool(make_modules, llm, paragraphs)
    save_checkpoint(tmp_path / "trained", modules, llm.identity)
    out = rekey(tmp_path / "trained", tmp_path / "rekeyed", llm, paragraphs[:50], dtype=torch.float32,
                key_encoder=DEFAULT_BACKBONE, key_dim=1024, lexical_key_weight=1.2)
    new, _ = load_checkpoint(out, llm.identity, llm.layout)
    assert torch.equal(new.compressor.token_pool.token_salience, modules.compressor.token_pool.token_salience)
    texts = paragraphs[:3]
    assert torch.equal(modules.eval().compressor.compress(texts).memory, new.compressor.compress(texts).memory)


def test_rekey_to_stored_picks_keeps_the_memory_and_refuses_a_trained_map_of_states(
    make_modules, bpe_tokenizer, paragraphs, tmp_path
):
    llm = tiny_llama(bpe_tokenizer)
    modules = _trained_token_pool(make_modules, llm, paragraphs)
    with torch.no_grad():  # as sharp as the shipped checkpoint's picks (8 of them hold 0.9999 of a slot)
        modules.compressor.token_pool.log_temperature.fill_(-1.5)
    save_checkpoint(tmp_path / "trained", modules, llm.identity)
    out = rekey(tmp_path / "trained", tmp_path / "picks", llm, paragraphs[:50], dtype=torch.float32, stored_picks=8)
    new, config = load_checkpoint(out, llm.identity, llm.layout)
    assert config["cmt"]["compressor"]["stored_picks"] == 8
    texts = paragraphs[:4]
    dense, picked = modules.eval().compressor.compress(texts), new.compressor.compress(texts)
    ids, weights = picked.picks  # (4, k, 8) each
    assert ids.shape == weights.shape == (4, 4, 8)
    assert torch.allclose(new.compressor.memory_from_picks(ids, weights), picked.memory, atol=1e-6)
    cosine = torch.nn.functional.cosine_similarity(dense.memory, picked.memory, dim=-1)  # (4, k)
    assert cosine.min() > 0.99, "8 picks hold nearly all of a slot's weight"

    with torch.no_grad():
        modules.compressor.token_pool.state_proj.weight.add_(0.01)
    save_checkpoint(tmp_path / "states", modules, llm.identity)
    with pytest.raises(ValueError, match="map of states"):
        rekey(tmp_path / "states", tmp_path / "refused", llm, paragraphs[:50], dtype=torch.float32, stored_picks=8)


def test_rekey_refuses_more_stored_slots_that_psi_and_pi_would_all_read(make_modules, bpe_tokenizer, paragraphs,
                                                                        tmp_path):
    # ψ and π were trained on 4 slots; 8 stored slots need select_slots=4 (the question reads 4 of them).
    llm = tiny_llama(bpe_tokenizer)
    modules = _trained_token_pool(make_modules, llm, paragraphs)
    save_checkpoint(tmp_path / "trained", modules, llm.identity)
    with pytest.raises(ValueError, match="select_slots=4"):
        rekey(tmp_path / "trained", tmp_path / "wide", llm, paragraphs[:50], dtype=torch.float32,
              stored_picks=2, num_memory_tokens=8)


def test_rekey_sets_how_questions_choose_their_slots_without_touching_a_weight(make_modules, bpe_tokenizer,
                                                                              paragraphs, tmp_path):
    llm = tiny_llama(bpe_tokenizer)
    modules = _trained_token_pool(make_modules, llm, paragraphs)
    save_checkpoint(tmp_path / "trained", modules, llm.identity)
    picks = rekey(tmp_path / "trained", tmp_path / "picks", llm, paragraphs[:50], dtype=torch.float32,
                  select={"select_slots": 4, "queries": "memories"}, stored_picks=2, num_memory_tokens=8)
    out = rekey(picks, tmp_path / "sum", llm, [], dtype=torch.float32,
                select={"select_pull": "sum", "select_own_weight": 0.0, "select_case_forms": True},
                alpha=0.5)  # ψ's reading, α: no IDF
    (before, before_config), (new, config) = (load_checkpoint(p, llm.identity, llm.layout) for p in (picks, out))
    a = new.config.aggregator
    assert (a.select_slots, a.select_pull, a.select_own_weight, a.select_case_forms) == (4, "sum", 0.0, True)
    assert config["metrics"]["alpha"] == 0.5  # the service's default memory-aware decoding weight
    # Θ unchanged byte for byte: the memories stored under the checkpoint before stay valid
    assert config["compressor_version"] == before_config["compressor_version"]
    assert (picks / "compressor.safetensors").read_bytes() == (out / "compressor.safetensors").read_bytes()
    texts = paragraphs[:3]
    assert torch.equal(before.compressor.compress(texts).key, new.compressor.compress(texts).key)


@pytest.mark.parametrize("rule", ["distinct", "spaced"])
def test_rekey_to_one_token_a_slot_picks_keeps_every_weight_and_changes_the_compressor_version(
    make_modules, bpe_tokenizer, paragraphs, tmp_path, rule
):
    llm = tiny_llama(bpe_tokenizer)
    modules = _trained_token_pool(make_modules, llm, paragraphs)
    save_checkpoint(tmp_path / "trained", modules, llm.identity)
    picks = rekey(tmp_path / "trained", tmp_path / "picks", llm, paragraphs[:50], dtype=torch.float32,
                  select={"select_slots": 4, "queries": "memories"}, stored_picks=1, num_memory_tokens=8)
    out = rekey(picks, tmp_path / rule, llm, paragraphs[:50], dtype=torch.float32, pick_rule=rule)
    (before, before_config), (new, config) = (load_checkpoint(p, llm.identity, llm.layout) for p in (picks, out))
    assert new.config.compressor.pick_rule == rule
    # memories stored under the stretch rule hold other tokens: the service must re-index them
    assert config["compressor_version"] != before_config["compressor_version"]
    old_state, new_state = before.compressor.trainable_state_dict(), new.compressor.trainable_state_dict()
    assert old_state.keys() == new_state.keys()
    for name, tensor in old_state.items():  # the unused soft tokens too: the file is reproducible
        assert torch.equal(tensor, new_state[name]), name
    text = paragraphs[0]
    slots = new.compressor.compress([text]).picks[0][0, :, 0].tolist()  # (k,)
    text_ids = iter(new.compressor.tokenize([text]).input_ids[0].tolist())
    assert all(t in text_ids for t in slots), f"{rule} picks are text tokens in text order, each once"


def test_rekey_to_more_stored_slots_gives_the_same_file_twice(make_modules, bpe_tokenizer, paragraphs, tmp_path):
    # A token pool's soft tokens are unused, but they are in Θ's file and so in its compressor version: a random
    # draw for the new slots made every re-keying a new version (memories to re-index) and the file irreproducible.
    llm = tiny_llama(bpe_tokenizer)
    modules = _trained_token_pool(make_modules, llm, paragraphs)
    save_checkpoint(tmp_path / "trained", modules, llm.identity)
    settings = {"select": {"select_slots": 4, "queries": "memories"}, "stored_picks": 1, "num_memory_tokens": 8}
    first, second = (rekey(tmp_path / "trained", tmp_path / name, llm, paragraphs[:50], dtype=torch.float32,
                           **settings) for name in ("first", "second"))
    (a, a_config), (b, b_config) = (load_checkpoint(p, llm.identity, llm.layout) for p in (first, second))
    assert a_config["compressor_version"] == b_config["compressor_version"]
    assert (first / "compressor.safetensors").read_bytes() == (second / "compressor.safetensors").read_bytes()
    assert not a.compressor.soft_tokens.any(), "the resized, unused soft tokens are zeros"
    texts = paragraphs[:3]
    with torch.no_grad():  # ...and unused indeed: the memory does not move when they do
        b.compressor.soft_tokens.normal_()
    assert torch.equal(a.compressor.compress(texts).picks[0], b.compressor.compress(texts).picks[0])
    assert torch.equal(a.compressor.compress(texts).memory, b.compressor.compress(texts).memory)
