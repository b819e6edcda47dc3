"""Acknowledged writes: a write is reported done only once `replicas` replicas of its master have it.

Why: Redis replication is asynchronous. A master acknowledges a write before any replica has
it, so a fail-over (Cluster or Sentinel promoting a replica) can drop writes the service already
answered 200 for. ``WAIT numreplicas timeout`` closes that window: it blocks until that many
replicas acknowledged the *calling connection's* last write.

Because WAIT counts the replication offset of the connection it runs on, the write scripts and
their WAIT go in one pipeline on one connection, to the master that owns the written keys'
slot. Every key of a bank carries the hash tag ``{bank}``, so one call touches one slot, one
master: one WAIT per call, whatever the number of documents or chunks.

When fewer replicas acknowledge in time the write has reached the master but is *not*
acknowledged: the caller gets `StorageUnavailableError` (503, Retry-After) and should retry.
A master left without replicas (its replica was promoted, the old master has not come back yet)
refuses acknowledged writes until one returns: that is the price of not losing them.

Known gap: a write that changes nothing (a put of an "unchanged" document, a delete of a missing
id) moves no replication offset, so its WAIT returns at once; if the same content was written by a
concurrent call whose own WAIT is still pending, this call can be acknowledged first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import (
    AskError,
    ConnectionError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    TimeoutError,
    TryAgainError,
)

from service.errors import InvalidInputError, StorageUnavailableError
from service.storage.connection import redact

REPLICATED_SCHEMES = frozenset({"redis+cluster", "rediss+cluster", "redis+sentinel"})
"""URL schemes of deployments that exist to survive a fail-over: acknowledged writes on by default."""
_NOT_EXECUTED = (MovedError, AskError, NoScriptError, TryAgainError)
"""Replies that mean the script did not run: safe to send again once the client's view is fixed."""


def default_wait_replicas(url: str | None) -> int:
    """1 for redis+cluster:// and redis+sentinel:// URLs, 0 for one server and the embedded default."""
    if not url:
        return 0
    return 1 if urlsplit(url).scheme.lower() in REPLICATED_SCHEMES else 0


@dataclass(frozen=True)
class ReplicaAcks:
    """How many replicas must acknowledge each write (0: off), and how long to wait for them."""

    replicas: int = 0
    timeout_ms: int = 1000

    def __post_init__(self) -> None:
        if self.replicas < 0 or self.timeout_ms <= 0:  # WAIT with timeout 0 would block forever
            raise InvalidInputError(f"replicas must be >= 0 and timeout_ms > 0, got {self.replicas}, {self.timeout_ms}")


WriteScript = Any  # a redis-py Script: script(keys=, args=), .sha, .script
Call = tuple[Sequence[Any], Sequence[Any]]  # (keys, args) of one script call


class AckedWriter:
    """Runs a store's write scripts and, when `acks.replicas` > 0, one WAIT after them on the same
    connection. Raises redis errors as they come (the store's guard maps them to 503), and
    `StorageUnavailableError` when too few replicas acknowledged."""

    def __init__(self, client: Any, url: str, acks: ReplicaAcks, slot_key: str) -> None:
        from redis.cluster import RedisCluster

        self._r = client
        self._url = url
        self.acks = acks
        self._slot_key = slot_key  # any key of the bank: they all live in its slot
        self._cluster = isinstance(client, RedisCluster)
        self._loaded: set[tuple[str, str]] = set()  # (node, script sha) known loaded: no NOSCRIPT round trip

    def run(self, op: str, script: WriteScript, calls: Sequence[Call], on_result: Callable[[int, Any], None]) -> None:
        """Run `script` once per call, in order; `on_result(i, output)` after each one that ran, then the
        replica check. Off: plain calls through the client (its own routing, retries, slot refresh)."""
        if not calls:
            return
        if self.acks.replicas == 0:
            for i, (keys, args) in enumerate(calls):
                on_result(i, script(keys=keys, args=args))
            return
        outputs, wait_reply = self._pipelined(script, calls)
        for i, out in enumerate(outputs):
            if isinstance(out, Exception):
                raise out
            on_result(i, out)
        if isinstance(wait_reply, Exception):
            raise wait_reply
        acked = int(wait_reply)
        if acked < self.acks.replicas:
            raise StorageUnavailableError(
                f"Redis {op}: the write reached the master at {redact(self._url)} but only {acked} of "
                f"{self.acks.replicas} replica(s) acknowledged it within {self.acks.timeout_ms} ms, so a fail-over "
                "could lose it; it is not acknowledged (retry once the replicas are back). To require fewer "
                "replicas set CMT_REDIS_WAIT_REPLICAS (0 turns the check off), to wait longer "
                "CMT_REDIS_WAIT_TIMEOUT_MS",
                details={"op": op, "backend": "redis", "cause": "replicas_not_acknowledged", "acknowledged": acked,
                         "required": self.acks.replicas, "timeout_ms": self.acks.timeout_ms,
                         "setting": "CMT_REDIS_WAIT_REPLICAS"},
            )

    def _pipelined(self, script: WriteScript, calls: Sequence[Call]) -> tuple[list[Any], Any]:
        """(script outputs or the error each got, WAIT's reply): one round trip to the master.

        EVALSHA only: the script is loaded once per master seen (not a SCRIPT EXISTS round trip per call).
        A reply saying the script did not run makes the pipeline be sent once more, after loading the
        script (NOSCRIPT: a restarted or promoted master) or re-reading the cluster's slot table (MOVED:
        a fail-over this client had not seen)."""
        for attempt in range(2):
            client, node = self._master()
            loaded = ("" if node is None else node.name, script.sha)
            pipe = client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.acks.replicas, self.acks.timeout_ms)
            try:
                if loaded not in self._loaded:
                    client.script_load(script.script)
                    self._loaded.add(loaded)
                res = pipe.execute(raise_on_error=False)
            except (ConnectionError, TimeoutError):
                self._refresh(client, node)  # the master is gone: the next call asks the cluster again
                raise
            stale = any(isinstance(r, _NOT_EXECUTED) for r in res[:-1])
            if not stale or attempt == 1:
                return list(res[:-1]), res[-1]
            if any(isinstance(r, NoScriptError) for r in res[:-1]):
                self._loaded.discard(loaded)
            else:
                self._refresh(client, node)
        raise AssertionError("unreachable")

    def _master(self) -> tuple[Any, Any]:
        """(a plain client on the master that owns the bank's slot, that node or None off a cluster)."""
        if not self._cluster:
            return self._r, None  # one server, or the Sentinel-managed pool that always dials the master
        node = self._r.get_node_from_key(self._slot_key)
        return self._r.get_redis_connection(node), node

    def _refresh(self, client: Any, node: Any) -> None:
        """Drop the node's sockets and re-read the cluster's slot table (what RedisCluster itself does
        after a connection error), so the next write goes to whoever owns the slot now."""
        if node is None:
            return
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            client.connection_pool.disconnect()
            self._r.nodes_manager.initialize(last_failed_node_name=node.name)


__all__ = ["REPLICATED_SCHEMES", "AckedWriter", "ReplicaAcks", "default_wait_replicas"]
