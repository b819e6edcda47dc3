from __future__ import annotations

import pytest
import torch

from service.errors import InvalidInputError, StorageUnavailableError
from service.storage import codec


def test_round_trip_is_bit_exact_fp16_and_bf16() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        memory = torch.randn(16, 384).to(dtype)  # (16, 384)
        key = torch.randn(384)  # (384,)
        value = codec.encode(memory, key, "ckpt-ü")
        assert len(value) == codec.encoded_size(16, 384, "ckpt-ü", key_dtype=key.dtype, memory_dtype=dtype)
        m2, k2, cv = codec.decode(value)
        assert cv == "ckpt-ü" and m2.dtype == dtype and k2.dtype == torch.float32
        assert torch.equal(m2.view(torch.uint8), memory.view(torch.uint8))  # bit-exact, NaN-safe compare
        assert torch.equal(k2, key)


def test_fp16_key_is_stored_in_two_bytes_per_value_and_decodes_exactly() -> None:
    memory, key = torch.randn(16, 384).half(), torch.nn.functional.normalize(torch.randn(384), dim=0).half()
    value = codec.encode(memory, key, "v1")
    fp16, fp32 = (codec.encoded_size(16, 384, "v1", key_dtype=d) for d in (torch.float16, torch.float32))
    assert len(value) == fp16 == fp32 - 2 * 384
    m2, k2, _ = codec.decode(value)
    assert torch.equal(m2, memory) and torch.equal(k2, key.float())
    prefix = codec.decode_prefix(value[: codec.prefix_length(value[: codec.HEADER_SIZE])])
    assert torch.equal(torch.from_numpy(prefix.key), key.float())


def test_encoded_size_is_the_length_encode_writes_for_every_key_dtype() -> None:
    # The bank-bytes gauge and POST /documents' memory_bytes come from encoded_size: it must pick
    # the key width exactly as encode does (fp16 as is, bf16/fp32/fp64 as fp32).
    memory = torch.randn(4, 8).half()  # (4, 8)
    for key_dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        key = torch.randn(8).to(key_dtype)  # (8,)
        assert len(codec.encode(memory, key, "cv-1")) == codec.encoded_size(4, 8, "cv-1", key_dtype=key_dtype)
    with pytest.raises(InvalidInputError):
        codec.encoded_size(4, 8, "cv-1", key_dtype=torch.float16, memory_dtype=torch.float32)


def test_prefix_decodes_key_without_memory() -> None:
    memory, key = torch.randn(4, 8).half(), torch.randn(8)
    value = codec.encode(memory, key, "v1")
    need = codec.prefix_length(value[: codec.HEADER_SIZE])
    p = codec.decode_prefix(value[:need])
    assert (p.k, p.d_m, p.compressor_version) == (4, 8, "v1")
    assert torch.equal(torch.from_numpy(p.key), key)
    with pytest.raises(codec.CorruptMemoryError):
        codec.decode_prefix(value[: need - 1])


@pytest.mark.parametrize(
    "memory,key,match",
    [
        (torch.randn(16, 384, dtype=torch.float16)[0], torch.randn(384), "shape"),
        (torch.randn(16, 384).double(), torch.randn(384), "dtype"),
        (torch.randn(16, 384).half(), torch.randn(2, 384), "key must have shape"),
        (torch.full((2, 4), float("nan")).half(), torch.randn(4), "NaN"),
        (torch.randn(2, 4).half(), torch.tensor([float("inf"), 0, 0, 0]), "NaN or infinite"),
        (torch.randn(2, 4).half(), torch.zeros(4), "zero vector"),
    ],
)
def test_bad_input_is_a_clear_invalid_input(memory: torch.Tensor, key: torch.Tensor, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        codec.encode(memory, key, "v1")


def test_bad_version_rejected() -> None:
    with pytest.raises(InvalidInputError):
        codec.encode(torch.randn(2, 4).half(), torch.randn(4), "")
    with pytest.raises(InvalidInputError):
        codec.encode(torch.randn(2, 4).half(), torch.randn(4), "x" * 256)


def test_corrupt_values_raise_storage_error() -> None:
    value = codec.encode(torch.randn(2, 4).half(), torch.randn(4), "v1")
    for bad in (b"", value[:10], b"XXXX" + value[4:], value[:-1], value + b"\0"):
        with pytest.raises(codec.CorruptMemoryError):
            codec.decode(bad)
    assert issubclass(codec.CorruptMemoryError, StorageUnavailableError)


def test_fp32_memory_cast_to_fp16_and_overflow_rejected() -> None:
    m = torch.randn(2, 4)
    assert codec.to_storable_memory(m).dtype == torch.float16
    with pytest.raises(InvalidInputError, match="range"):
        codec.to_storable_memory(torch.full((2, 4), 1e6))


def test_key_as_wide_as_the_memory_is_written_in_format_1_byte_for_byte_as_before() -> None:
    # A rollback to a build that reads only format 1 must still read what a standard checkpoint stores.
    import struct

    memory, key = torch.randn(2, 4).half(), torch.randn(4).half()
    value = codec.encode(memory, key, "cv")
    old_layout = struct.pack("<4sBBBBII", b"CMTM", 1, 1, 4, 2, 2, 4) + b"cv" + key.numpy().tobytes()
    assert value == old_layout + memory.numpy().tobytes()


def test_key_of_another_width_than_the_memory_round_trips_in_format_2_and_its_prefix_alone_decodes() -> None:
    memory, key = torch.randn(4, 8).half(), torch.randn(24).half()  # (k, d_m), (d_k,) with d_k > d_m
    value = codec.encode(memory, key, "cv-2")
    assert value[4] == 2
    assert len(value) == codec.encoded_size(4, 8, "cv-2", key_dtype=torch.float16, d_k=24)
    m2, k2, cv = codec.decode(value)
    assert cv == "cv-2" and torch.equal(m2, memory) and torch.equal(k2, key.float())
    need = codec.prefix_length(value[: codec.HEADER_SIZE])
    p = codec.decode_prefix(value[:need])
    assert (p.k, p.d_m, p.key.shape) == (4, 8, (24,))
    with pytest.raises(codec.CorruptMemoryError):
        codec.decode(value[:-1])
    narrow = codec.encode(memory, torch.randn(6), "cv-2")  # a key narrower than the memory (no lexical part)
    assert narrow[4] == 2 and codec.decode(narrow)[1].shape == (6,)


def test_token_picks_round_trip_bit_exact_in_format_3() -> None:
    picks = codec.TokenPicks(torch.randint(0, 70_000, (32, 8)), torch.rand(32, 8).half())
    key = torch.randn(2048).half()
    value = codec.encode(picks, key, "cv-3")
    assert value[4] == 3
    assert len(value) == codec.encoded_size(32, 8, "cv-3", key_dtype=torch.float16, d_k=2048, picks=True)
    assert len(value) == 20 + 4 + 2 * 2048 + 32 * 8 * 6  # 1,536 B of picks instead of 36,864 B of memory
    back, k2, cv = codec.decode(value)
    assert isinstance(back, codec.TokenPicks) and cv == "cv-3"
    assert torch.equal(back.ids, picks.ids) and torch.equal(back.weights, picks.weights)
    assert torch.equal(k2, key.float())
    assert codec.decode_prefix(value[: codec.prefix_length(value[: codec.HEADER_SIZE])]).k == 32
    with pytest.raises(codec.CorruptMemoryError, match="bytes"):
        codec.decode(value[:-2])


def test_token_picks_that_cannot_be_stored_are_refused() -> None:
    key = torch.randn(16)
    ids, weights = torch.randint(0, 100, (4, 8)), torch.rand(4, 8).half()
    for bad, match in [
        (codec.TokenPicks(ids.float(), weights), "integer ids"),
        (codec.TokenPicks(ids, weights.float()), "fp16 weights"),
        (codec.TokenPicks(ids[:, :4], weights), "one shape"),
        (codec.TokenPicks(ids - 200, weights), r"\[0, 2\*\*32\)"),
        (codec.TokenPicks(ids, torch.full((4, 8), float("nan")).half()), "NaN"),
    ]:
        with pytest.raises(InvalidInputError, match=match):
            codec.encode(bad, key, "v1")


def test_a_dense_memory_code_in_format_3_is_corrupt() -> None:
    value = bytearray(codec.encode(codec.TokenPicks(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2).half()),
                                   torch.randn(4), "v1"))
    value[5] = 1  # fp16 memory code under the token-picks format
    with pytest.raises(codec.CorruptMemoryError, match="format 3"):
        codec.decode(bytes(value))
