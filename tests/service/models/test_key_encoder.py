from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from service.errors import CheckpointMismatchError, InvalidInputError
from service.models.checkpoint import load_checkpoint, save_checkpoint
from service.models.cmt import CMTModules
from service.models.compressor import Compressor
from service.models.config import DEFAULT_BACKBONE
from service.models.key_encoder import KeyEncoder
from tests.conftest import small_cmt_config, tiny_gpt2


def _compressor(minilm, bpe_tokenizer, **compressor) -> Compressor:
    """Θ on a tiny GPT-2 backbone (BPE tokenizer, memory width 64) with the real MiniLM (width 384) as its
    separate key encoder; the key is 384 + 256 wide."""
    torch.manual_seed(0)
    config = small_cmt_config(key_encoder=DEFAULT_BACKBONE, memory_dim=64, key_dim=640, **compressor).compressor
    encoder, encoder_tokenizer = minilm
    return Compressor(config, tiny_gpt2(bpe_tokenizer).model.transformer, bpe_tokenizer,
                      KeyEncoder(copy.deepcopy(encoder), encoder_tokenizer)).eval()


def _sentence_embeddings(minilm, texts):
    encoder, tokenizer = minilm
    enc = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def test_key_is_the_encoders_sentence_embedding_then_the_lexical_part(minilm, bpe_tokenizer):
    texts = ["The Rhine flows through Basel.", "Which river flows through Basel?", "Denver won Super Bowl 50."]
    expected = _sentence_embeddings(minilm, texts)  # (3, 384)
    dense_only = _compressor(minilm, bpe_tokenizer).compress(texts)
    assert dense_only.key.shape == (3, 640) and dense_only.memory.shape == (3, 4, 64)
    assert torch.allclose(dense_only.key[:, :384], expected, atol=1e-5)
    assert torch.equal(dense_only.key[:, 384:], torch.zeros(3, 256))

    beta = 1.5
    both = _compressor(minilm, bpe_tokenizer, lexical_key_weight=beta).compress(texts).key  # (3, 640)
    norm = (1 + beta**2) ** 0.5
    assert torch.allclose(both[:, :384] * norm, expected, atol=1e-5), "the dense part is kept, only scaled"
    lexical = both[:, 384:] * norm / beta  # (3, 256) each text's unit lexical vector
    assert torch.allclose(lexical.norm(dim=-1), torch.ones(3), atol=1e-5)
    cosines = both @ both.T
    assert torch.allclose(cosines, (expected @ expected.T + beta**2 * lexical @ lexical.T) / norm**2, atol=1e-5)


def test_a_key_too_narrow_for_the_lexical_part_is_refused(minilm, bpe_tokenizer):
    config = small_cmt_config(key_encoder=DEFAULT_BACKBONE, lexical_key_weight=0.5).compressor  # key_dim = 384
    with pytest.raises(InvalidInputError, match="no room for the lexical part"):
        Compressor(config, copy.deepcopy(minilm[0]), minilm[1], KeyEncoder(copy.deepcopy(minilm[0]), minilm[1]))
    with pytest.raises(InvalidInputError, match="only with a key_encoder"):
        small_cmt_config(key_dim=1024)


def test_long_text_key_pools_every_window_and_batching_does_not_change_it(minilm, bpe_tokenizer, paragraphs):
    compressor = _compressor(minilm, bpe_tokenizer)
    long_text = " ".join(paragraphs[:6])
    texts = ["A short note about Basel.", long_text]
    windows = compressor.key_encoder.tokenize(texts)
    assert int((windows.text_index == 1).sum()) > 1, "the long text must span several encoder windows"
    together = compressor.compress(texts).key
    for i, text in enumerate(texts):
        assert torch.allclose(together[i], compressor.compress([text]).key[0], atol=1e-5)
    first_window_only = _sentence_embeddings(minilm, [long_text])[0]  # MiniLM truncated to its first window
    assert float(together[1, :384] @ first_window_only) < 0.999, "the windows after the first must count"


def test_lexical_part_counts_the_key_encoders_words(minilm, bpe_tokenizer, paragraphs):
    compressor = _compressor(minilm, bpe_tokenizer, lexical_key_weight=1.0)
    assert compressor.lexical_key.weight.shape == (len(minilm[1]),), "hashed over the encoder's vocabulary"
    assert compressor.lexical_key.dim == 640 - 384
    compressor.fit_lexical_idf(paragraphs)
    rare = minilm[1].convert_tokens_to_ids("rhine")
    common = minilm[1].convert_tokens_to_ids("the")
    assert compressor.lexical_key.weight[rare] > compressor.lexical_key.weight[common]
    dense_only = _compressor(minilm, bpe_tokenizer)
    q, doc, other = "Where is Preirdusk Labs?", "Preirdusk Labs opened in Basel.", "Douskveis Labs opened in Basel."
    with_lexical = compressor.compress([q, doc, other]).key
    without = dense_only.compress([q, doc, other]).key
    margin = lambda k: float(k[0] @ k[1] - k[0] @ k[2])  # noqa: E731
    assert margin(with_lexical) > margin(without), "an exact rare-name match must count more with the lexical part"


def test_checkpoint_holds_no_key_encoder_weights_and_refuses_another_encoder(
    tmp_path, minilm, bpe_tokenizer, paragraphs
):
    llm = tiny_gpt2(bpe_tokenizer)
    config = small_cmt_config(key_encoder=DEFAULT_BACKBONE, lexical_key_weight=0.5, key_dim=1024)
    torch.manual_seed(0)
    compressor = Compressor(config.compressor, copy.deepcopy(minilm[0]), minilm[1],
                            KeyEncoder(copy.deepcopy(minilm[0]), minilm[1]))
    compressor.fit_lexical_idf(paragraphs)
    modules = CMTModules(config, compressor, llm.layout)
    assert not any(n.startswith(("key_encoder.", "key_proj.")) for n in compressor.trainable_state_dict())
    save_checkpoint(tmp_path, modules, llm.identity)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["key_encoder"]["name"] == DEFAULT_BACKBONE

    loaded, _ = load_checkpoint(tmp_path, llm.identity, llm.layout)
    texts = paragraphs[:2] + ["Which river flows through Basel?"]
    assert torch.allclose(loaded.compressor.compress(texts).key, compressor.eval().compress(texts).key, atol=1e-5)

    saved["key_encoder"]["fingerprint"] = "0" * 64
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointMismatchError, match="key encoder"):
        load_checkpoint(tmp_path, llm.identity, llm.layout)


def test_a_key_encoder_named_in_the_config_must_be_given(minilm, bpe_tokenizer):
    config = small_cmt_config(key_encoder=DEFAULT_BACKBONE).compressor
    with pytest.raises(InvalidInputError, match="key_encoder"):
        Compressor(config, copy.deepcopy(minilm[0]), minilm[1])


def test_keys_alone_equal_the_keys_of_the_full_forward(minilm, bpe_tokenizer, make_modules, paragraphs):
    texts = paragraphs[:3] + ["Which river flows through Basel?"]
    with_encoder = _compressor(minilm, bpe_tokenizer, lexical_key_weight=1.2)
    with_encoder.fit_lexical_idf(paragraphs)
    plain = make_modules(tiny_gpt2(bpe_tokenizer), lexical_key_weight=0.5).compressor.eval()
    for compressor in (with_encoder, plain):
        assert torch.allclose(compressor.keys(texts), compressor.compress(texts).key, atol=1e-6)
