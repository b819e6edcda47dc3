"""The index snapshot file: a `VectorIndex`'s arrays and the event-stream position they reflect.

Why: rebuilding the index from Redis costs a scan plus an HNSW build (12.6 s at 10^5 documents,
minutes at 10^6); loading the arrays and the graph back costs reading a file. What a snapshot
is trusted for, and when it is not, is `index_restore.py`'s business; this module only writes
and reads the file, refusing one that is not intact.

One file per bank (`index-<bank>.cmtidx`), integers little-endian::

    MAGIC                       8 bytes
    payload                     the arrays, raw, each at a multiple of 64 bytes (zero padding)
    header                      JSON: format, bank identity, dimension, rows, stream position,
                                string tables, array specs (dtype, shape, offset), sha256 of the payload
    sha256(header)              32 bytes
    len(header)                 uint64
    MAGIC                       8 bytes

The header trails the payload so the writer streams each array once, hashing as it writes, with
no copy of a 1.5 GB key matrix; the reader checks the header's own checksum, identity and
position before it reads the payload, and reads each array straight into the state's (larger)
column, hashing as it reads. No pickle: arrays are raw bytes of a fixed set of plain dtypes named
in the header, strings are JSON or one NUL-joined UTF-8 blob (document ids hold no NUL). Written
to a temporary file, fsynced, then renamed over the old one (and the folder fsynced): a reader
sees the old snapshot or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from service.storage.index_state import StateColumns

FORMAT_VERSION = 1
KIND = "cmt-index-snapshot"
MAGIC = b"CMTIDX\x00\x01"
_TRAILER = struct.Struct("<32sQ8s")  # sha256(header), len(header), magic
_ALIGN = 64
_CHUNK = 64 << 20  # bytes read or written per call: bounds the hashing stride, not memory
# name → (dtype, number of dimensions); the only arrays a snapshot may hold, in file order
_ARRAYS: dict[str, tuple[str, int]] = {
    "keys": ("<f4", 2), "alive": ("|b1", 1), "pub": ("<i8", 1), "recv": ("<i8", 1),
    "src": ("<i4", 1), "cv": ("<i4", 1), "ids": ("|u1", 1), "graph": ("|u1", 1),
}


class SnapshotRejected(Exception):
    """A snapshot that must not be served: unreadable, corrupt, of another bank, or stale."""


@dataclass(frozen=True)
class BankIdentity:
    """What names the bank a snapshot was taken of."""

    bank: str
    namespace: str  # the bank's event-stream key in Redis: bank name and key-layout version


@dataclass(frozen=True)
class StreamMark:
    """The event-stream position a snapshot reflects: every event up to `last_id` is in it."""

    last_id: str  # "0-0" before the first event
    seq: int  # entries ever added to the stream up to last_id (XINFO entries-added numbering)
    event: tuple[str, str] | None  # (op, doc id) of the entry at last_id, when still in the stream


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    bytes: int
    rows: int
    alive: int
    write_s: float  # encode + hash + write + fsync, off the index lock


def snapshot_path(folder: Path, bank: str) -> Path:
    """The file of `bank` in `folder` (a bank name that is no plain file name is hashed)."""
    safe = bank if re.fullmatch(r"[A-Za-z0-9._-]{1,100}", bank) else hashlib.sha256(bank.encode()).hexdigest()[:32]
    return Path(folder) / f"index-{safe}.cmtidx"


# -- writing -------------------------------------------------------------------------------------
def _raw(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _write_hashed(f: BinaryIO, h: Any, data: memoryview) -> None:
    for s in range(0, len(data), _CHUNK):
        part = data[s : s + _CHUNK]
        h.update(part)
        f.write(part)


def _payload_arrays(c: StateColumns) -> list[tuple[str, np.ndarray]]:
    blob = "\0".join(c.ids).encode("utf-8")
    if blob.count(b"\0") != c.n - 1:
        raise ValueError("a document id contains NUL: cannot be stored in an index snapshot")
    n = c.n
    arrays = [("keys", c.keys[:n]), ("alive", c.alive[:n]), ("pub", c.pub[:n]), ("recv", c.recv[:n]),
              ("src", c.src[:n]), ("cv", c.cv[:n]), ("ids", np.frombuffer(blob, np.uint8))]
    if c.graph is not None:
        arrays.append(("graph", c.graph))
    return arrays


def write_snapshot(
    path: Path, c: StateColumns, identity: BankIdentity, mark: StreamMark, extra: dict[str, Any] | None = None
) -> SnapshotInfo:
    """Write `c` atomically to `path` (temp file, fsync, rename, fsync of the folder)."""
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            h, off, specs = hashlib.sha256(), 0, []
            for name, a in _payload_arrays(c):
                pad = bytes(-off % _ALIGN)
                _write_hashed(f, h, memoryview(pad))
                off += len(pad)
                specs.append({"name": name, "dtype": _ARRAYS[name][0], "shape": list(a.shape), "offset": off})
                _write_hashed(f, h, _raw(a))
                off += a.nbytes
            alive = c.alive[: c.n]
            counts = np.bincount(c.cv[: c.n][alive], minlength=len(c.cv_names))  # (versions,)
            header = {
                "kind": KIND, "format": FORMAT_VERSION, "bank": identity.bank, "namespace": identity.namespace,
                "dim": c.d, "rows": c.n, "alive": int(alive.sum()),
                "stream": {"last_id": mark.last_id, "seq": mark.seq,
                           "event": None if mark.event is None else list(mark.event)},
                "src_names": c.src_names, "cv_names": c.cv_names,
                "compressor_versions": {v: int(k) for v, k in zip(c.cv_names, counts, strict=True) if k},
                "arrays": specs, "payload_bytes": off, "payload_sha256": h.hexdigest(),
                "created_at": datetime.now(UTC).isoformat(), **(extra or {}),
            }
            hb = json.dumps(header, sort_keys=True).encode("utf-8")
            f.write(hb)
            f.write(_TRAILER.pack(hashlib.sha256(hb).digest(), len(hb), MAGIC))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return SnapshotInfo(path, path.stat().st_size, c.n, int(header["alive"]), time.perf_counter() - start)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading -------------------------------------------------------------------------------------
def read_header(path: Path) -> dict[str, Any]:
    """The header of the snapshot at `path`, its checksum verified (SnapshotRejected otherwise)."""
    try:
        size = path.stat().st_size
        if size < len(MAGIC) + _TRAILER.size:
            raise SnapshotRejected(f"truncated ({size} bytes)")
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
            f.seek(size - _TRAILER.size)
            digest, n, magic = _TRAILER.unpack(f.read(_TRAILER.size))
            if head != MAGIC or magic != MAGIC:
                raise SnapshotRejected("not an index snapshot (bad magic)")
            if n > size - len(MAGIC) - _TRAILER.size:
                raise SnapshotRejected("corrupt: header length beyond the file")
            f.seek(size - _TRAILER.size - n)
            hb = f.read(n)
    except OSError as exc:
        raise SnapshotRejected(f"unreadable: {exc}") from exc
    if hashlib.sha256(hb).digest() != digest:
        raise SnapshotRejected("corrupt: header checksum mismatch")
    header = json.loads(hb)
    if header.get("kind") != KIND or header.get("format") != FORMAT_VERSION:
        raise SnapshotRejected(f"format {header.get('kind')!r} v{header.get('format')}, expected {KIND} "
                               f"v{FORMAT_VERSION}")
    header["_payload_end"] = size - _TRAILER.size - n
    return header


def _specs(header: dict[str, Any]) -> list[dict[str, Any]]:
    """The header's array specs, checked against the arrays a snapshot may hold."""
    n, d = int(header["rows"]), int(header["dim"])
    specs = header["arrays"]
    names = [s["name"] for s in specs]
    if names not in (list(_ARRAYS)[:-1], list(_ARRAYS)):
        raise SnapshotRejected(f"corrupt: arrays {names}")
    for s in specs:
        dtype, ndim = _ARRAYS[s["name"]]
        shape = tuple(int(x) for x in s["shape"])
        want = (n, d) if s["name"] == "keys" else (n,) if s["name"] not in ("ids", "graph") else shape
        if s["dtype"] != dtype or len(shape) != ndim or shape != want:
            raise SnapshotRejected(f"corrupt: array {s['name']} {s['dtype']} {shape}")
    return specs


def read_columns(path: Path, header: dict[str, Any], headroom: int = 1024) -> StateColumns:
    """The arrays of the snapshot whose `read_header` is `header`, payload checksum verified.

    Columns get `headroom` spare rows, so appends after the load do not copy them at once.
    """
    specs = _specs(header)
    n, d = int(header["rows"]), int(header["dim"])
    cap = n + max(headroom, 0)
    cols = {"keys": np.zeros((cap, d), np.float32), "alive": np.zeros(cap, bool),
            "pub": np.zeros(cap, np.int64), "recv": np.zeros(cap, np.int64),
            "src": np.full(cap, -1, np.int32), "cv": np.zeros(cap, np.int32)}
    h, off, blobs = hashlib.sha256(), 0, {}
    try:
        with open(path, "rb") as f:
            f.seek(len(MAGIC))
            for s in specs:
                gap = int(s["offset"]) - off
                if not 0 <= gap < _ALIGN:
                    raise SnapshotRejected(f"corrupt: array {s['name']} at offset {s['offset']}")
                h.update(f.read(gap))
                shape = tuple(int(x) for x in s["shape"])
                target = cols[s["name"]][:n] if s["name"] in cols else np.empty(shape, np.uint8)
                _read_hashed(f, h, _raw_writable(target))
                blobs[s["name"]] = target
                off = int(s["offset"]) + target.nbytes
    except OSError as exc:
        raise SnapshotRejected(f"unreadable: {exc}") from exc
    if off != int(header["payload_bytes"]) or len(MAGIC) + off != header["_payload_end"]:
        raise SnapshotRejected("corrupt: payload length differs from the header")
    if h.hexdigest() != header["payload_sha256"]:
        raise SnapshotRejected("corrupt: payload checksum mismatch")
    ids = bytes(blobs["ids"]).decode("utf-8").split("\0") if n else []
    if len(ids) != n:
        raise SnapshotRejected(f"corrupt: {len(ids)} ids for {n} rows")
    return StateColumns(d=d, n=n, ids=ids, src_names=list(header["src_names"]), cv_names=list(header["cv_names"]),
                        graph=blobs.get("graph"), **cols)


def _raw_writable(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))  # a view: reading into it fills `a`


def _read_hashed(f: BinaryIO, h: Any, into: memoryview) -> None:
    for s in range(0, len(into), _CHUNK):
        part = into[s : s + _CHUNK]
        got = f.readinto(part)  # type: ignore[attr-defined]
        if got != len(part):
            raise SnapshotRejected("truncated payload")
        h.update(part)


__all__ = [
    "FORMAT_VERSION",
    "BankIdentity",
    "SnapshotInfo",
    "SnapshotRejected",
    "StreamMark",
    "read_columns",
    "read_header",
    "snapshot_path",
    "write_snapshot",
]
