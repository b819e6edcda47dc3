from __future__ import annotations

import pytest
import torch

from service.errors import InvalidInputError, PayloadTooLargeError
from service.models.config import CompressorConfig
from tests.conftest import tiny_gpt2


@pytest.fixture
def compressor(make_modules, bpe_tokenizer):
    return make_modules(tiny_gpt2(bpe_tokenizer)).compressor.eval()


def test_memory_and_key_shapes_and_normalised_key(compressor, paragraphs):
    out = compressor.compress(paragraphs[:3])
    assert out.memory.shape == (3, 4, 384)
    assert out.key.shape == (3, 384)
    assert torch.allclose(out.key.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_frozen_backbone_stays_in_eval_mode_so_training_sees_the_features_inference_sees(compressor, paragraphs):
    compressor.train()
    assert compressor.blocks.training and not compressor.backbone.training
    batch = compressor.tokenize(paragraphs[:2])
    runs = [
        compressor.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1]), "backbone dropout is active in training"


def test_untrained_key_is_the_backbones_mean_pooled_sentence_embedding(compressor, paragraphs):
    texts = ["The Rhine flows through Basel.", paragraphs[0][:400]]
    batch = compressor.tokenize(texts)
    assert len(batch.doc_index) == 2, "one chunk per text here"
    with torch.no_grad():
        hidden = compressor.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        m = batch.attention_mask[..., None].float()
        expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    assert torch.allclose(compressor.compress(texts).key, expected, atol=1e-5)


def test_checkpoint_configs_from_before_the_pooled_key_keep_the_learned_only_key():
    from service.models.config import CMTConfig

    legacy = CMTConfig().to_dict()
    del legacy["compressor"]["key_from_backbone"]
    assert CMTConfig.from_dict(legacy).compressor.key_from_backbone is False
    assert CMTConfig.from_dict(CMTConfig().to_dict()).compressor.key_from_backbone is True


def test_batching_documents_of_different_lengths_matches_one_by_one(compressor, paragraphs):
    texts = [paragraphs[0], "A short note.", paragraphs[1] * 3]
    together = compressor.compress(texts)
    for i, text in enumerate(texts):
        alone = compressor.compress([text])
        assert torch.allclose(together.memory[i], alone.memory[0], atol=1e-4)


def test_long_document_is_chunked_and_its_end_still_shapes_the_memory(compressor, paragraphs):
    long_doc = " ".join(paragraphs[:12])
    batch = compressor.tokenize([long_doc])
    n_tokens = len(compressor.tokenizer(long_doc, add_special_tokens=False)["input_ids"])
    assert n_tokens > 1500 and len(batch.doc_index) >= n_tokens // 256
    assert batch.chunk_index.tolist() == list(range(len(batch.doc_index)))
    changed_end = long_doc + " The final sentence reports a flood in Zorvath."
    a, b = compressor.compress([long_doc]), compressor.compress([changed_end])
    assert (a.memory - b.memory).abs().max() > 1e-4, "text past the first window must reach the memory"


def test_bad_texts_are_refused_with_clear_errors(compressor):
    with pytest.raises(InvalidInputError, match="empty"):
        compressor.tokenize(["ok", "   "])
    with pytest.raises(InvalidInputError, match="non-empty list"):
        compressor.tokenize([])
    with pytest.raises(InvalidInputError, match="non-empty list"):
        compressor.tokenize("a bare string")
    with pytest.raises(InvalidInputError):
        compressor.tokenize([123])  # type: ignore[list-item]


def test_document_longer_than_max_chunks_is_refused_not_cut(make_modules, bpe_tokenizer, paragraphs):
    compressor = make_modules(tiny_gpt2(bpe_tokenizer), max_chunks=2).compressor
    with pytest.raises(PayloadTooLargeError, match="split the document"):
        compressor.tokenize([" ".join(paragraphs[:10])])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_memory_tokens": 0}, "num_memory_tokens"),
        ({"memory_dim": 100, "num_heads": 8}, "divisible"),
        ({"chunk_overlap": 200}, "chunk_overlap"),
        ({"max_chunks": -1}, "max_chunks"),
        ({"backbone": ""}, "backbone"),
    ],
)
def test_invalid_compressor_config_names_the_field(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        CompressorConfig(**kwargs)
