"""When a `SyncedIndex` writes its snapshot, and when it may start from one instead of Redis.

Why: a replica restarting during an incident must serve in seconds, not after a full rebuild
(scan + HNSW build: minutes at 10^6 documents). Start-up loads the bank's snapshot
(`index_snapshot.py`) and replays only the stream events after its position; every doubt falls
back to the full rebuild, logged with its reason, so a wrong index is never served:

* unreadable, truncated, checksum or format mismatch → corrupt;
* another bank or key namespace, or keys of another dimension than the model's → foreign;
* the stream no longer holds the events after the snapshot's position (trimmed past it,
  dropped, recreated: the entry at that position must still be there with the same op and
  id) → stale;
* after the replay, while nothing is written, the index must agree with Redis on the document
  count, the count per compressor version, and a random sample of documents (key, version,
  metadata) → otherwise it is refused.

Snapshots are written in a background thread: every `interval_s` when the index changed, soon
after a full rebuild (`request`), and on `close` (clean shutdown). Only the capture holds the
index lock (alive flags, the id list and the HNSW links are copied; keys are append-only rows);
hashing and writing run off it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import StorageUnavailableError
from service.settings import Settings
from service.storage.base import IndexEntry, MemoryStore
from service.storage.index_snapshot import (
    BankIdentity,
    SnapshotInfo,
    SnapshotRejected,
    StreamMark,
    read_columns,
    read_header,
    snapshot_path,
    write_snapshot,
)
from service.storage.index_state import IndexState

if TYPE_CHECKING:
    from service.storage.sync import SyncedIndex

log = logging.getLogger(__name__)
_MAX_SEQ = 2**64 - 1


def identity_of(store: MemoryStore) -> BankIdentity:
    return BankIdentity(store.bank, str(getattr(store, "events_key", f"bank:{store.bank}")))


def entry_before(entry_id: str) -> str:
    """The greatest stream id below `entry_id` (XREAD after it starts at `entry_id`)."""
    ms, seq = (int(x) for x in entry_id.split("-"))
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{_MAX_SEQ}"


def event_at(store: MemoryStore, entry_id: str) -> tuple[str, str] | None:
    """(op, doc id) of the stream entry `entry_id`, None if the stream no longer holds it."""
    if entry_id == "0-0":
        return None
    got = store.read_events(entry_before(entry_id), count=1)
    return (got[0].op, got[0].doc_id) if got and got[0].entry_id == entry_id else None


def check_stream(store: MemoryStore, mark: StreamMark) -> None:
    """Raise SnapshotRejected unless the stream still holds every event after `mark`."""
    pos = store.stream_position()
    if mark.seq == 0:
        if pos is not None and pos.entries_added > pos.length:
            raise SnapshotRejected("stale: taken before the first event, and the stream was trimmed since")
        return
    if pos is None:
        raise SnapshotRejected("stale: the bank's event stream is gone (bank dropped?)")
    if pos.entries_added < mark.seq:
        raise SnapshotRejected(f"stale: the stream has {pos.entries_added} events ever added, the snapshot "
                               f"reflects {mark.seq} (stream recreated)")
    if pos.entries_added - pos.length > mark.seq:
        raise SnapshotRejected(f"stale: the stream was trimmed past the snapshot's position "
                               f"({pos.entries_added - pos.length} events trimmed, snapshot at {mark.seq})")
    if (pos.last_id, pos.entries_added) == (mark.last_id, mark.seq):
        return  # nothing written since
    if mark.event is None or event_at(store, mark.last_id) != mark.event:
        raise SnapshotRejected(f"stale: the stream no longer holds the snapshot's position {mark.last_id} "
                               "as recorded")


@dataclass(frozen=True)
class RestoreInfo:
    path: Path
    load_s: float  # header, stream check, payload read and checksum, state and graph
    replay_s: float  # events after the snapshot's position, and the agreement check
    replayed: int  # stream events read
    documents: int


class IndexSnapshots:
    """Snapshots of one `SyncedIndex` in `folder` (one file per bank).

    `dim`: the key width the model makes (a snapshot of another is refused); None = any.
    `interval_s`: seconds between background snapshots, each only if the index changed;
    0 = only after a full rebuild and at close. `probes`: documents compared with Redis after
    a restore.
    """

    def __init__(self, folder: Path, *, interval_s: float = 300.0, dim: int | None = None, probes: int = 16) -> None:
        self.folder = Path(folder)
        self.interval_s = interval_s
        self.dim = dim
        self.probes = probes
        self.last_saved: SnapshotInfo | None = None
        self.last_restore: RestoreInfo | None = None
        self.last_rejection: str | None = None
        self.writes = 0
        self.checks = 0  # writer-thread wake-ups (each checks whether the index changed)
        self._saved_key: tuple[int, str] | None = None  # (index changes, stream position) of the file
        self._save_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probe_ids: list[str] = []

    def path_for(self, store: MemoryStore) -> Path:
        return snapshot_path(self.folder, store.bank)

    # -- restore -------------------------------------------------------------------------------
    def restore(self, synced: SyncedIndex) -> bool:
        """Load the snapshot into `synced` and replay the events after it; False (logged) if none
        is usable, the index then being left for the caller to rebuild."""
        path = self.path_for(synced.store)
        if not path.exists():
            log.info("no index snapshot at %s: rebuilding from Redis", path)
            return False
        t0 = time.perf_counter()
        try:
            synced.install(lambda: self.load(synced.store, path))
            t1 = time.perf_counter()
            replayed = synced.catch_up()
            replayed += self._check_agreement(synced)
        except SnapshotRejected as exc:
            self.last_rejection = str(exc)
            log.warning("index snapshot %s not used (%s): rebuilding from Redis", path, exc)
            return False
        done = time.perf_counter()
        self.last_restore = RestoreInfo(path, t1 - t0, done - t1, replayed, len(synced))
        if replayed == 0:  # the file already holds this index: no need to write it again
            self._saved_key = synced.change_key()
        log.info("index restored from %s: %d documents, %d events replayed, %.2f s",
                 path, len(synced), replayed, done - t0)
        return True

    def load(self, store: MemoryStore, path: Path) -> tuple[IndexState, StreamMark]:
        """The state in `path` and its stream position; identity, dimension and stream position are
        checked before the payload is read (SnapshotRejected for any doubt)."""
        try:
            header = read_header(path)
            ident, mark = identity_of(store), _mark_of(header)
            if (header["bank"], header["namespace"]) != (ident.bank, ident.namespace):
                raise SnapshotRejected(f"foreign: snapshot of bank {header['bank']!r} ({header['namespace']}), "
                                       f"serving {ident.bank!r} ({ident.namespace})")
            if self.dim is not None and int(header["dim"]) != self.dim:
                raise SnapshotRejected(f"foreign: keys of dimension {header['dim']}, the model makes {self.dim}")
            check_stream(store, mark)
            state = IndexState.from_columns(read_columns(path, header, headroom=max(1024, header["rows"] // 8)))
        except (SnapshotRejected, StorageUnavailableError):
            raise
        except Exception as exc:  # any other failure to parse means the file cannot be trusted
            raise SnapshotRejected(f"corrupt: {type(exc).__name__}: {exc}") from exc
        live = np.flatnonzero(state.alive[: state.n])  # (n_alive,)
        pick = np.random.default_rng().choice(live, size=min(self.probes, len(live)), replace=False)
        self._probe_ids = [state.ids[int(r)] for r in pick]
        return state, mark

    def _check_agreement(self, synced: SyncedIndex, attempts: int = 3) -> int:
        """Compare the caught-up index with Redis while no event arrives; returns events replayed."""
        store, replayed = synced.store, 0
        for _ in range(attempts):
            before = store.stream_position()
            count, versions = store.count(), store.version_counts()
            current = store.fetch_index_entries(self._probe_ids)
            if store.stream_position() == before and synced.last_id == ("0-0" if before is None else before.last_id):
                _compare(synced, count, versions, current)
                return replayed
            replayed += synced.catch_up()  # written meanwhile: catch up and look again
        log.info("bank %s kept changing: restored index compared by stream position only", store.bank)
        return replayed

    # -- write ---------------------------------------------------------------------------------
    def save(self, synced: SyncedIndex, *, force: bool = False) -> SnapshotInfo | None:
        """Write the snapshot now unless nothing changed since the last one (or `force`)."""
        with self._save_lock:
            cols, mark_id, seq, key = synced.capture()
            if key == self._saved_key and not force:
                return None
            path = self.path_for(synced.store)
            if cols is None:  # empty index: nothing worth keeping (an older file is replayed or found stale)
                return None
            mark = StreamMark(mark_id, seq, event_at(synced.store, mark_id))
            extra = {"hnsw_m": synced.index.hnsw_m, "ef_construction": synced.index.ef_construction}
            info = write_snapshot(path, cols, identity_of(synced.store), mark, extra)
            self.writes += 1
            self._saved_key, self.last_saved = key, info
            log.info("index snapshot written: %s, %d documents, %.1f MB, %.2f s",
                     path, info.alive, info.bytes / 1e6, info.write_s)
            return info

    def up_to_date(self, synced: SyncedIndex) -> bool:
        """True when the file holds the index as it is now (no change since the last snapshot)."""
        return self._saved_key == synced.change_key()

    def request(self) -> None:
        """Ask the writer thread for a snapshot soon (after a full rebuild)."""
        self._wake.set()

    def start(self, synced: SyncedIndex) -> None:
        """Start the writer thread (periodic snapshots, and those `request`ed)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(synced,), daemon=True,
                                        name=f"cmt-index-snapshot-{synced.store.bank}")
        self._thread.start()

    def _run(self, synced: SyncedIndex) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s if self.interval_s > 0 else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._save_logged(synced)
            self.checks += 1

    def _save_logged(self, synced: SyncedIndex) -> None:
        try:
            self.save(synced)
        except StorageUnavailableError as exc:  # the stream position cannot be recorded: try next time
            log.warning("index snapshot of bank %s postponed: %s", synced.store.bank, exc.message)
        except Exception:  # a full disk must not take serving down: the old snapshot stays
            log.exception("index snapshot of bank %s failed; keeping the previous one", synced.store.bank)

    def close(self, synced: SyncedIndex) -> None:
        """Stop the writer thread, then write a last snapshot if the index changed (clean shutdown)."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:  # never started (start-up failed): the index is no bank's state
            return
        self._thread.join()
        self._thread = None
        try:  # the newest position we can have: less to replay at the next start
            synced.catch_up()
        except StorageUnavailableError:
            pass  # Redis gone first: the snapshot keeps the position the index has
        self._save_logged(synced)


def _mark_of(header: dict[str, Any]) -> StreamMark:
    s = header["stream"]
    event = s.get("event")
    return StreamMark(str(s["last_id"]), int(s["seq"]), None if event is None else (str(event[0]), str(event[1])))


def _compare(synced: SyncedIndex, count: int, versions: dict[str, int], current: dict[str, IndexEntry | None]) -> None:
    """Raise SnapshotRejected where the caught-up index and Redis disagree."""
    index = synced.index
    if len(index) != count or index.version_counts() != versions:
        raise SnapshotRejected(f"differs from Redis after replay: {len(index)} documents "
                               f"{index.version_counts()}, Redis has {count} {versions}")
    for doc_id, e in current.items():
        key, hit = index.key_of(doc_id), index.entry(doc_id)
        if e is None or key is None or hit is None:
            if not (e is None and key is None):
                raise SnapshotRejected(f"differs from Redis after replay: document {doc_id!r} present in one only")
            continue
        want = np.asarray(e.key, np.float32).reshape(-1)  # (d,)
        if want.shape != key.shape:  # another checkpoint's key: the index holds it as zeros (IndexState.upsert)
            want = np.zeros_like(key)
        want = want / max(float(np.linalg.norm(want)), 1e-30)
        same = (np.allclose(key, want, atol=1e-6)
                and (hit.compressor_version, hit.source, hit.published_at, hit.received_at)
                == (e.compressor_version, e.source, e.published_at, e.received_at))
        if not same:
            raise SnapshotRejected(f"differs from Redis after replay: document {doc_id!r}")


def snapshots_from_settings(settings: Settings, *, dim: int | None = None) -> IndexSnapshots | None:
    """The service's snapshots: `index_snapshot_dir`, else `<data_dir>-index` beside the embedded
    Redis; none with a Redis URL and no folder given, or with `index_snapshots` off."""
    if not settings.index_snapshots:
        return None
    folder = settings.index_snapshot_dir
    if folder is None and settings.redis_url is None:
        data = settings.data_dir.expanduser().resolve()
        folder = data.with_name(data.name + "-index")
    if folder is None:
        return None
    return IndexSnapshots(folder.expanduser(), interval_s=settings.index_snapshot_interval_s, dim=dim)


__all__ = ["IndexSnapshots", "RestoreInfo", "SnapshotRejected", "check_stream", "snapshots_from_settings"]
