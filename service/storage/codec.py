"""Binary encoding of one stored memory: a fixed header and raw little-endian bytes, no pickle.

Why not pickle: a value read back from a shared Redis must never be able to run code. Why not
safetensors: both are < 0.1 ms at 100 KB (DESIGN §3), but a 16-byte header keeps the value within
a few percent of the theoretical k·d_m·2 bytes and lets the index rebuild read *only the prefix*
(header + compressor version + retrieval key) with one GETRANGE, skipping the k×d_m memory.

Layout (all integers little-endian)::

    offset size  field
    0      4     magic b"CMTM"
    4      1     format version (1, 2 or 3)
    5      1     memory code (1 = fp16, 2 = bf16; 5 = token picks, format 3 only)
    6      1     key dtype code (3 = fp32, 4 = fp16)
    7      1     length L of the compressor version (UTF-8, 1..255 bytes)
    8      4     k (uint32)
    12     4     d_m (uint32); m, the picks per slot, for token picks
    16     4     d_k, the key's width (uint32): formats 2 and 3; format 1 has d_k = d_m and no such field
    H      L     compressor version                       (H = 16 for format 1, 20 for formats 2 and 3)
    H+L    w·d_k retrieval key, fp16 (w=2) or fp32 (w=4)    # (d_k,)
    ...    2·k·d_m memory, fp16 or bf16, row-major         # (k, d_m)
    or, format 3 (token picks):
    ...    4·k·m   token ids, uint32, row-major            # (k, m)
    ...    2·k·m   their weights, fp16, row-major          # (k, m)

A value whose key is as wide as its memory is written in format 1, byte for byte what builds before
format 2 wrote (so a rollback still reads it); a key of another width (a checkpoint with a key
encoder, CompressorConfig.key_dim) needs format 2. Format 3 holds a memory stored as token picks
(`TokenPicks`, CompressorConfig.stored_picks): 6 bytes a pick instead of 2·d_m bytes a slot (SmolLM2,
k=32, m=8: 1,536 B instead of 36,864 B). All three are read; a build before format 3 refuses its values
with "format version 3", so a rollback reindexes rather than misreads.

Both parts are stored in the dtype they come in, so the round trip is bit-exact: an fp16 key in
2 bytes per value (what the service's Θ hands over: `Engine.compress` casts memory and key to
fp16), any other floating key in fp32 (4 bytes: keeps a caller's fp32 key exact); the memory in
fp16 or bf16 (`to_storable_memory` casts a wider one to fp16). Keys always decode to fp32.
`encoded_size` is the one formula for a value's size; it picks the key width as `encode` does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from service.errors import InvalidInputError, StorageUnavailableError

MAGIC = b"CMTM"
FORMAT_VERSION = 3
HEADERS = {1: struct.Struct("<4sBBBBII"), 2: struct.Struct("<4sBBBBIII"), 3: struct.Struct("<4sBBBBIII")}
"""Per format: magic, format, memory code, key code, cv length, k, d_m (or m)[, d_k]."""
HEADER_SIZE = HEADERS[FORMAT_VERSION].size  # 20: enough bytes to parse either format's header
MAX_VERSION_BYTES = 255
MAX_K = 4096
MAX_D_M = 65536

_MEM_DTYPES: dict[int, torch.dtype] = {1: torch.float16, 2: torch.bfloat16}
_MEM_CODES: dict[torch.dtype, int] = {v: k for k, v in _MEM_DTYPES.items()}
_PICKS = 5
_PICK_BYTES = 6  # a uint32 token id and its fp16 weight
_KEY_FP32 = 3
_KEY_FP16 = 4
# key dtype code → (numpy dtype, bytes per value). An fp16 key saves 2·d_m bytes per document
# (768 B at d_m=384, a 5% of the value) and is plenty for cosine top-k; an fp32 key is kept as is.
_KEY_FORMATS: dict[int, tuple[str, int]] = {_KEY_FP32: ("<f4", 4), _KEY_FP16: ("<f2", 2)}


def _key_code(dtype: torch.dtype) -> int:
    """How a key of `dtype` is stored: fp16 as is, every other floating dtype as fp32."""
    return _KEY_FP16 if dtype == torch.float16 else _KEY_FP32


class CorruptMemoryError(StorageUnavailableError):
    """A stored value is not a valid encoded memory (truncated, wrong magic, unknown format).

    It is a storage fault, not the caller's: it maps to 503 like any other storage failure.
    """

    code = "storage_corrupt"


@dataclass(frozen=True)
class TokenPicks:
    """A memory stored as token picks (CompressorConfig.stored_picks): slot j is Σ_i weights[j, i] ·
    E[ids[j, i]], E the token embeddings of Θ's backbone, rebuilt when read (`Engine.dense_memories`).
    Exact for Θ's token-pool memory, which is such a mix (service.models.token_pool)."""

    ids: torch.Tensor  # (k, m) integer token ids
    weights: torch.Tensor  # (k, m) fp16

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ids.shape)


Memory = torch.Tensor | TokenPicks
"""What one stored value holds besides its key: a dense (k, d_m) memory or its token picks."""


@dataclass(frozen=True)
class DecodedPrefix:
    """What the index needs from a stored value: version, sizes and the retrieval key."""

    compressor_version: str
    k: int
    d_m: int  # m for token picks
    key: np.ndarray  # (d_k,) float32


def _check_version(compressor_version: str) -> bytes:
    if not isinstance(compressor_version, str) or not compressor_version:
        raise InvalidInputError("compressor_version must be a non-empty string")
    raw = compressor_version.encode("utf-8")
    if len(raw) > MAX_VERSION_BYTES:
        raise InvalidInputError(
            f"compressor_version is {len(raw)} bytes in UTF-8; at most {MAX_VERSION_BYTES}"
        )
    return raw


def _validate_picks(picks: TokenPicks) -> None:
    ids, weights = picks.ids, picks.weights
    if not isinstance(ids, torch.Tensor) or not isinstance(weights, torch.Tensor):
        raise InvalidInputError("token picks must hold torch tensors")
    if ids.dim() != 2 or ids.shape != weights.shape:
        raise InvalidInputError(f"token picks need ids and weights of one shape (k, m); got {tuple(ids.shape)} "
                                f"and {tuple(weights.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or weights.dtype != torch.float16:
        raise InvalidInputError(f"token picks need integer ids and fp16 weights; got {ids.dtype}, {weights.dtype}")
    if ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < 2**32):
        raise InvalidInputError("token pick ids must lie in [0, 2**32)")
    if not bool(torch.isfinite(weights).all()):
        raise InvalidInputError("token pick weights contain NaN or infinite values")


def validate_memory(memory: Memory, key: torch.Tensor) -> tuple[int, int, int]:
    """Check shapes, dtypes and finiteness; return (k, d_m, d_k), d_m = m for token picks.
    Raises InvalidInputError."""
    if isinstance(memory, TokenPicks):
        _validate_picks(memory)
        memory = memory.weights  # (k, m): shape and range checks below
    if not isinstance(memory, torch.Tensor) or not isinstance(key, torch.Tensor):
        raise InvalidInputError("memory and key must be torch tensors")
    if memory.dim() != 2:
        raise InvalidInputError(f"memory must have shape (k, d_m); got {tuple(memory.shape)}")
    k, d_m = memory.shape
    if not (1 <= k <= MAX_K and 1 <= d_m <= MAX_D_M):
        raise InvalidInputError(f"memory shape {(k, d_m)} out of range (1..{MAX_K}, 1..{MAX_D_M})")
    if memory.dtype not in _MEM_CODES:
        raise InvalidInputError(f"memory dtype must be float16 or bfloat16; got {memory.dtype}")
    if key.dim() != 1 or not 1 <= key.shape[0] <= MAX_D_M:
        raise InvalidInputError(f"key must have shape (d_k,) with 1 <= d_k <= {MAX_D_M}; got {tuple(key.shape)}")
    if not key.dtype.is_floating_point:
        raise InvalidInputError(f"key must be a floating tensor; got {key.dtype}")
    if not bool(torch.isfinite(memory).all()):
        raise InvalidInputError("memory contains NaN or infinite values")
    if not bool(torch.isfinite(key).all()):
        raise InvalidInputError("key contains NaN or infinite values")
    if float(key.float().norm()) == 0.0:
        raise InvalidInputError("key is the zero vector; cosine retrieval is undefined for it")
    return int(k), int(d_m), int(key.shape[0])


def encode(memory: Memory, key: torch.Tensor, compressor_version: str) -> bytes:
    """Encode memory (k, d_m) fp16/bf16 or token picks (k, m), and key (d_k,) float, into one value
    (format 1 when d_k = d_m, 3 for token picks, else 2)."""
    version = _check_version(compressor_version)
    k, d_m, d_k = validate_memory(memory, key)
    key_code = _key_code(key.dtype)
    picks = isinstance(memory, TokenPicks)
    fields = (_PICKS if picks else _MEM_CODES[memory.dtype], key_code, len(version), k, d_m)
    fmt = 3 if picks else 1 if d_k == d_m else 2
    header = HEADERS[fmt].pack(MAGIC, fmt, *fields, *(() if fmt == 1 else (d_k,)))
    np_dtype = _KEY_FORMATS[key_code][0]
    key_bytes = key.detach().to("cpu", torch.float32).contiguous().numpy().astype(np_dtype).tobytes()  # (d_k,)
    if picks:
        ids = memory.ids.detach().to("cpu", torch.int64).numpy().astype("<u4").tobytes()  # (k, m)
        weights = memory.weights.detach().to("cpu").contiguous().numpy().astype("<f2").tobytes()  # (k, m)
        return b"".join((header, version, key_bytes, ids, weights))
    mem_u8 = memory.detach().to("cpu").contiguous().view(torch.uint8)  # (k, 2·d_m) raw bytes; bf16 has no numpy
    return b"".join((header, version, key_bytes, mem_u8.numpy().tobytes()))


@dataclass(frozen=True)
class _Header:
    fmt: int
    mem_code: int
    key_code: int
    vlen: int
    k: int
    d_m: int
    d_k: int
    size: int  # bytes of the header itself

    @property
    def key_offset(self) -> int:
        return self.size + self.vlen

    @property
    def memory_offset(self) -> int:
        return self.key_offset + _KEY_FORMATS[self.key_code][1] * self.d_k

    @property
    def memory_size(self) -> int:
        return self.k * self.d_m * (_PICK_BYTES if self.mem_code == _PICKS else 2)


def _parse_header(buf: bytes | memoryview) -> _Header:
    if len(buf) < 5 or bytes(buf[:4]) != MAGIC:
        raise CorruptMemoryError(f"stored value starts with {bytes(buf[:4])!r}, not {MAGIC!r}: not a CMT memory")
    fmt = buf[4]
    if fmt not in HEADERS:
        raise CorruptMemoryError(f"stored memory has format version {fmt}; this build reads {sorted(HEADERS)}")
    struct_ = HEADERS[fmt]
    if len(buf) < struct_.size:
        raise CorruptMemoryError(f"stored memory value is {len(buf)} bytes, shorter than its header")
    _, _, mem_code, key_code, vlen, k, d_m, *rest = struct_.unpack_from(buf, 0)
    d_k = rest[0] if rest else d_m
    if (mem_code == _PICKS) != (fmt == 3) or mem_code not in (*_MEM_DTYPES, _PICKS) or key_code not in _KEY_FORMATS:
        raise CorruptMemoryError(f"stored memory of format {fmt} has unknown codes ({mem_code}, {key_code})")
    if vlen == 0 or not (1 <= k <= MAX_K and 1 <= d_m <= MAX_D_M and 1 <= d_k <= MAX_D_M):
        raise CorruptMemoryError(f"stored memory header is out of range (k={k}, d_m={d_m}, d_k={d_k}, L={vlen})")
    return _Header(fmt, mem_code, key_code, vlen, k, d_m, d_k, struct_.size)


def prefix_length(value_prefix: bytes) -> int:
    """Bytes needed to decode the key prefix, given at least the header (HEADER_SIZE bytes); used to re-fetch."""
    return _parse_header(value_prefix).memory_offset


def decode_prefix(buf: bytes) -> DecodedPrefix:
    """Decode the compressor version and key from the start of a value (GETRANGE suffices).

    Raises CorruptMemoryError if `buf` is shorter than needed (use prefix_length to re-fetch).
    """
    h = _parse_header(buf)
    if len(buf) < h.memory_offset:
        raise CorruptMemoryError(f"stored memory prefix is {len(buf)} bytes; needs {h.memory_offset}")
    try:
        version = bytes(buf[h.size : h.key_offset]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptMemoryError("stored compressor version is not UTF-8") from exc
    key_dtype = _KEY_FORMATS[h.key_code][0]
    key = np.frombuffer(buf, dtype=key_dtype, count=h.d_k, offset=h.key_offset).astype(np.float32)  # (d_k,)
    return DecodedPrefix(version, h.k, h.d_m, key)


def decode(buf: bytes) -> tuple[Memory, torch.Tensor, str]:
    """Decode a full value into (memory (k, d_m) fp16/bf16 or TokenPicks (k, m), key (d_k,) fp32,
    compressor_version)."""
    h = _parse_header(buf)
    k, d_m = h.k, h.d_m
    expected = h.memory_offset + h.memory_size
    if len(buf) != expected:
        raise CorruptMemoryError(
            f"stored memory value is {len(buf)} bytes; header (k={k}, d_m={d_m}, d_k={h.d_k}) says {expected}"
        )
    prefix = decode_prefix(buf[: h.memory_offset])
    key = torch.from_numpy(prefix.key)  # (d_k,)
    if h.mem_code == _PICKS:
        ids = np.frombuffer(buf, dtype="<u4", count=k * d_m, offset=h.memory_offset).astype(np.int64)  # (k·m,)
        weights = np.frombuffer(buf, dtype="<f2", count=k * d_m, offset=h.memory_offset + 4 * k * d_m)  # (k·m,)
        picks = TokenPicks(torch.from_numpy(ids).reshape(k, d_m), torch.from_numpy(weights.copy()).reshape(k, d_m))
        return picks, key, prefix.compressor_version
    raw = np.frombuffer(buf, dtype=np.uint8, count=k * d_m * 2, offset=h.memory_offset)  # (2·k·d_m,)
    memory = torch.from_numpy(raw.copy()).view(_MEM_DTYPES[h.mem_code]).reshape(k, d_m)  # (k, d_m)
    return memory, key, prefix.compressor_version


def theoretical_bytes(k: int, d_m: int) -> int:
    """k·d_m·2: the fp16 payload a memory cannot be smaller than."""
    return k * d_m * 2


def encoded_size(
    k: int, d_m: int, compressor_version: str, *, key_dtype: torch.dtype, memory_dtype: torch.dtype = torch.float16,
    d_k: int | None = None, picks: bool = False,
) -> int:
    """Exact size of encode()'s output for a (k, d_m) memory (or, with `picks`, TokenPicks of m = d_m
    per slot) and a (d_k,) key (default d_k = d_m) of these dtypes.

    `memory_dtype` is the dtype handed to encode (fp16 or bf16: 2 bytes a value); `key_dtype`
    decides the key's width exactly as encode does (fp16: 2 bytes, any other: 4).
    """
    if memory_dtype not in _MEM_CODES:
        raise InvalidInputError(f"memory dtype must be float16 or bfloat16; got {memory_dtype}")
    d_k = d_m if d_k is None else d_k
    header = HEADERS[3 if picks else 1 if d_k == d_m else 2].size
    key_width = _KEY_FORMATS[_key_code(key_dtype)][1]
    payload = k * d_m * (_PICK_BYTES if picks else 2)
    return header + len(compressor_version.encode("utf-8")) + key_width * d_k + payload


def to_storable_memory(memory: Memory) -> Memory:
    """Cast an fp32/fp64 memory to fp16 (the storage dtype); fp16/bf16 and token picks pass unchanged.

    Values beyond fp16's range would become inf: that is the caller's error, reported clearly.
    """
    if isinstance(memory, TokenPicks) or memory.dtype in _MEM_CODES:
        return memory
    if not memory.dtype.is_floating_point:
        raise InvalidInputError(f"memory must be a floating tensor; got {memory.dtype}")
    finite = memory[torch.isfinite(memory)]  # (n_finite,)
    if finite.numel() and float(finite.abs().max()) > 65504.0:
        raise InvalidInputError("memory has values beyond float16's range (|x| > 65504)")
    return memory.to(torch.float16)


__all__ = [
    "HEADER_SIZE",
    "CorruptMemoryError",
    "DecodedPrefix",
    "Memory",
    "TokenPicks",
    "decode",
    "decode_prefix",
    "encode",
    "encoded_size",
    "prefix_length",
    "theoretical_bytes",
    "to_storable_memory",
    "validate_memory",
]
