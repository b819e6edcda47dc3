"""Kill a master in the middle of an ingest, and count what the clients were told versus what survived.

A thread writes one document per `put_many` call, as fast as the store answers, and records
which were acknowledged and which raised `StorageUnavailableError` (503). The caller's `kill`
SIGKILLs the master that owns the bank, `promote` waits until the topology names a new one,
`restart` brings the killed node back as a replica (an orchestrator's job; with WAIT on, a master
without replicas cannot acknowledge writes). Once writes are acknowledged again, every
acknowledged document is read back and compared bit for bit: those that are missing or differ
are "lost". Shared by test_failover.py and bench/bench_wait.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.errors import StorageUnavailableError
from service.storage.base import MemoryStore

from .helpers import doc, memory_for
from .redis_procs import Node, replica_online, wait_for


class Ingest(threading.Thread):
    """Writes doc-<n>, n = 0, 1, 2 ... one per call until stopped; records each outcome with its time."""

    def __init__(self, store: MemoryStore, first: int = 0) -> None:
        super().__init__(daemon=True, name="failover-ingest")
        self.store = store
        self.n = first
        self.acked: dict[int, float] = {}  # doc number -> monotonic time acknowledged
        self.failed: list[tuple[float, int, str]] = []  # (monotonic time, doc number, cause)
        self.stop = threading.Event()
        self.crash: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                n, self.n = self.n, self.n + 1
                try:
                    self.store.put_many([(doc(n), *memory_for(n))], "v1")
                    self.acked[n] = time.monotonic()
                except StorageUnavailableError as exc:
                    self.failed.append((time.monotonic(), n, str(exc.details.get("cause", "?"))))
                    self.stop.wait(0.01)  # retry pacing, as a client honouring Retry-After would
        except BaseException as exc:  # anything but a 503 is a bug the test must see
            self.crash = exc

    def acked_after(self, t: float) -> int:
        return sum(1 for v in list(self.acked.values()) if v > t)


@dataclass
class FailoverReport:
    acked: int
    failed: int
    lost: list[int]
    causes: dict[str, int]
    first_error_after_kill_s: float | None
    window_s: float  # first to last failed call
    recovered_after_s: float  # kill to the first acknowledged write after the last failed one
    promoted_after_s: float
    replica_back_after_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def lost_documents(store: MemoryStore, numbers: list[int]) -> list[int]:
    """Acknowledged documents that are missing or whose memory or text differ from what was written."""
    lost = []
    for start in range(0, len(numbers), 200):
        chunk = numbers[start : start + 200]
        got = store.get_memories([f"doc-{n}" for n in chunk])
        for n, g in zip(chunk, got, strict=True):
            if g is None or not g.memory.equal(memory_for(n)[0]) or not g.key.equal(memory_for(n)[1]):
                lost.append(n)
    for n in numbers:
        if n not in lost:
            rec = store.get(f"doc-{n}")
            if rec is None or rec.text != doc(n).text:
                lost.append(n)
    return sorted(lost)


def kill_master_mid_ingest(
    store: MemoryStore,
    kill: Callable[[], Node],
    promote: Callable[[Node], Node],
    restart: Callable[[Node, Node], None],
    *,
    before: int = 30,
    after: int = 30,
    timeout_s: float = 40.0,
) -> FailoverReport:
    """Ingest, kill the bank's master after `before` acknowledged writes, wait for the promotion and the
    restarted node's re-sync, then for `after` acknowledged writes past the last failure; check them all."""
    ingest = Ingest(store)
    ingest.start()
    try:
        wait_for(lambda: len(ingest.acked) >= before or ingest.crash, timeout_s, f"{before} acknowledged writes")
        t_kill = time.monotonic()
        old = kill()
        new = promote(old)
        t_promoted = time.monotonic()
        restart(old, new)
        wait_for(lambda: replica_online(new), timeout_s, "the restarted node in sync as a replica")
        t_replica = time.monotonic()

        def recovered() -> bool:
            last = max((t for t, _, _ in ingest.failed), default=t_kill)
            return ingest.crash is not None or ingest.acked_after(max(last, t_replica)) >= after
        wait_for(recovered, timeout_s, f"{after} acknowledged writes after the fail-over")
    finally:
        ingest.stop.set()
        ingest.join(timeout=30)
    if ingest.crash is not None:
        raise ingest.crash
    errors = [t for t, _, _ in ingest.failed if t >= t_kill]
    last_error = max(errors, default=t_kill)
    causes: dict[str, int] = {}
    for _, _, cause in ingest.failed:
        causes[cause] = causes.get(cause, 0) + 1
    return FailoverReport(
        acked=len(ingest.acked),
        failed=len(ingest.failed),
        lost=lost_documents(store, sorted(ingest.acked)),
        causes=causes,
        first_error_after_kill_s=(min(errors) - t_kill) if errors else None,
        window_s=(last_error - min(errors)) if errors else 0.0,
        recovered_after_s=min(t for t in ingest.acked.values() if t > last_error) - t_kill,
        promoted_after_s=t_promoted - t_kill,
        replica_back_after_s=t_replica - t_kill,
    )
