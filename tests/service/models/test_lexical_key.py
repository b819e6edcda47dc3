from __future__ import annotations

import pytest
import torch

from service.errors import InvalidInputError
from service.models.config import CompressorConfig
from service.models.lexical_key import LexicalKey
from tests.conftest import tiny_gpt2
from trainer.data import DEMO_SYNTHETIC, examples, synthetic_stream


def _encode(key: LexicalKey, tokenizer, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        return key(enc["input_ids"], enc["attention_mask"], torch.arange(len(texts)), len(texts))


def test_lexical_vector_is_the_signed_weighted_sum_of_the_distinct_tokens_in_their_buckets(minilm):
    _, tok = minilm
    key = LexicalKey(len(tok), 64, tok.all_special_ids)
    with torch.no_grad():
        key.weight.uniform_(0.5, 3.0, generator=torch.Generator().manual_seed(0))
    texts = ["Varn river Oskel river", "The Qelmar bridge opened in 1931."]
    for text, got in zip(texts, _encode(key, tok, texts), strict=True):
        expected = torch.zeros(64)
        for t in set(tok(text, add_special_tokens=False)["input_ids"]):
            expected[key.bucket[t]] += key.weight[t].detach() * key.sign[t]
        assert torch.allclose(got, torch.nn.functional.normalize(expected, dim=0), atol=1e-6)


def test_lexical_vector_depends_on_the_set_of_tokens_not_their_order_count_or_padding(minilm):
    _, tok = minilm
    key = LexicalKey(len(tok), 384, tok.all_special_ids)
    texts = ["Varn river Oskel", "Oskel Oskel river Varn", "Varn river Basel", "a much longer text " * 20]
    a, b, c, long = _encode(key, tok, texts)
    assert torch.allclose(a, b, atol=1e-6), "word order, repeats and padding must not matter"
    assert float(a @ c) < 0.9 and torch.allclose(a.norm(), torch.tensor(1.0))
    assert torch.allclose(_encode(key, tok, ["Varn river Oskel"])[0], a, atol=1e-6), "batch padding leaked in"


def test_idf_weights_rare_tokens_above_common_ones(minilm):
    _, tok = minilm
    corpus = [f"the company said {w} grew" for w in ("Varn", "Oskel", "Basel", "Triskbras")]
    key = LexicalKey(len(tok), 384, tok.all_special_ids)
    key.fit_idf(tok(corpus, add_special_tokens=False)["input_ids"])
    the, varn = tok.convert_tokens_to_ids(["the", "basel"])
    assert key.weight[varn] > key.weight[the] > 0


def test_negative_or_infinite_lexical_weight_is_refused():
    for bad in (-0.5, float("inf"), float("nan")):
        with pytest.raises(InvalidInputError, match="lexical_key_weight"):
            CompressorConfig(lexical_key_weight=bad)


def test_lexical_key_tells_apart_invented_names_that_the_dense_key_confuses(make_modules, bpe_tokenizer):
    """Regression: the demo's trained key retrieved 'Douskveis Labs' for a question on 'Preirdusk Labs'
    (training had blurred the entity names: 8.5% of its top-1 documents were about another company).
    The stand-in for such a key here: the untrained learned-only key, which barely knows names."""
    stream = synthetic_stream(DEMO_SYNTHETIC)
    docs = stream["test"]
    exs = examples(docs)[:200]
    corpus = [d["text"] for d in stream["train"]] + [e.question for e in examples(stream["train"])]
    entity_of = {d["doc_id"]: d["entity"] for d in docs}
    misses = {}
    for beta in (0.0, 1.0):
        modules = make_modules(tiny_gpt2(bpe_tokenizer), lexical_key_weight=beta, key_from_backbone=False)
        compressor = modules.compressor.eval()
        compressor.fit_lexical_idf(corpus)
        bank = torch.cat(
            [compressor.compress([d["text"] for d in docs[i : i + 128]]).key for i in range(0, len(docs), 128)]
        )
        top = (compressor.compress([e.question for e in exs]).key @ bank.T).argmax(1).tolist()
        # top-1 about another company
        misses[beta] = sum(docs[t]["entity"] != entity_of[e.doc_id] for t, e in zip(top, exs, strict=True))
    assert misses[0.0] >= 4 and misses[1.0] <= misses[0.0] // 4, misses
