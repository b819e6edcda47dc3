"""Real Redis topologies on loopback, started as processes: a Redis Cluster (masters + replicas) and a
Sentinel group (master, replica, three sentinels). The fail-over tests and bench/bench_wait.py use
them; every wait polls a condition with a deadline (no blind sleeps).

No persistence (``--appendonly no --save ""``): a killed node comes back empty and re-syncs from
whoever is master now, which is what the fail-over scenarios need.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from service.storage.embedded import free_port, wait_until_answers

HAVE_REDIS = shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None
POLL_S = 0.02


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `cond` until it returns something truthy; raise AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = cond()
            if got:
                return got
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last error: {last})")


@dataclass
class Node:
    """One redis-server (or sentinel) process: started, SIGKILLed and started again with the same arguments."""

    port: int
    args: list[str]
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, extra: list[str] | None = None) -> Node:
        """Start the process (again), with `extra` arguments appended this time only."""
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 (the process owns it)
        self.proc = subprocess.Popen([*self.args, *(extra or [])], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()
        wait_until_answers(f"redis://127.0.0.1:{self.port}/0", 30.0, self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last replication flush: what a crashed machine does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.send_signal(signal.SIGCONT)  # in case it was paused
            self.proc.wait()

    def use(self, fn: Callable[[redis.Redis], Any]) -> Any:
        """`fn(client)` on a short-lived client of this node."""
        r = redis.Redis(port=self.port, socket_timeout=2.0, socket_connect_timeout=0.5)
        try:
            return fn(r)
        finally:
            r.close()

    def call(self, *args: Any) -> Any:
        return self.use(lambda r: r.execute_command(*args))

    def pause(self, paused: bool) -> None:
        """SIGSTOP / SIGCONT: a replica that stops reading its replication stream (a stalled machine)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _server_args(port: int, d: Path, extra: list[str]) -> list[str]:
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
            "--appendonly", "no", "--save", "", "--repl-diskless-sync-delay", "0", *extra]


def replica_online(node: Node) -> bool:
    """The node is a master with at least one replica whose link is up and synced."""
    info = node.use(lambda r: r.info("replication"))
    return info.get("role") == "master" and any(
        isinstance(v, dict) and v.get("state") == "online" for k, v in info.items() if k.startswith("slave")
    )


@dataclass
class LocalCluster:
    """`masters` masters with `replicas` replicas each, created by ``redis-cli --cluster create``."""

    root: Path
    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 2000
    nodes: list[Node] = field(default_factory=list)

    def start(self) -> LocalCluster:
        for n in range(self.masters * (1 + self.replicas)):
            port, bus = free_port(), free_port()  # explicit bus port: port+10000 can exceed 65535
            d = self.root / f"node-{n}"
            self.nodes.append(Node(port, _server_args(port, d, [
                "--cluster-enabled", "yes", "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms)]), d).start())
        if len(self.nodes) == 1:  # redis-cli wants 3 masters: one node simply takes every slot
            self.nodes[0].call("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        else:
            subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                            "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        wait_for(lambda: all(b"cluster_state:ok" in n.call("CLUSTER", "INFO") for n in self.nodes), 30,
                 "cluster_state:ok on every node")
        if self.replicas:
            wait_for(lambda: all(replica_online(m) for m in self.master_nodes()), 30, "every replica online")
        return self

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def by_port(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def _table(self) -> list[tuple[int, str, str, str, list[tuple[int, int]]]]:
        """(port, flags, node id, its master's id or "-", slot ranges) of every node, as a live node's
        CLUSTER NODES says."""
        live = next(n for n in self.nodes if n.alive)
        rows = []
        for line in live.call("CLUSTER", "NODES").decode().splitlines():
            parts = line.split()
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            ranges = []
            for s in parts[8:]:
                if not s.startswith("["):
                    lo, _, hi = s.partition("-")
                    ranges.append((int(lo), int(hi or lo)))
            rows.append((port, parts[2], parts[0], parts[3], ranges))
        return rows

    def master_nodes(self) -> list[Node]:
        return [self.by_port(p) for p, flags, *_ in self._table() if "master" in flags and "fail" not in flags]

    def replica_of(self, master: Node) -> Node:
        table = self._table()
        mid = next(i for p, _, i, _, _ in table if p == master.port)
        return next(self.by_port(p) for p, flags, _, of, _ in table if "slave" in flags and of == mid)

    def _owner(self, key: str) -> Node | None:
        live = next(n for n in self.nodes if n.alive)
        slot = int(live.call("CLUSTER", "KEYSLOT", key))
        for port, flags, _, _, ranges in self._table():
            if "master" in flags and "fail" not in flags and any(lo <= slot <= hi for lo, hi in ranges):
                return self.by_port(port)
        return None  # mid fail-over: the failed master still holds the slot

    def owner_of(self, key: str) -> Node:
        """The master that serves `key`'s slot now."""
        owner = self._owner(key)
        assert owner is not None, f"no live master serves {key!r}"
        return owner

    def wait_promoted(self, key: str, old: Node, timeout_s: float = 30.0) -> Node:
        """Wait until another node owns `key`'s slot and the cluster is ok again; that node."""
        def promoted() -> Node | None:
            new = self._owner(key)
            ok = all(b"cluster_state:ok" in n.call("CLUSTER", "INFO") for n in self.nodes if n.alive)
            return new if new is not None and new.port != old.port and ok else None
        return wait_for(promoted, timeout_s, f"a replica promoted in place of :{old.port}")

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()


@dataclass
class LocalSentinel:
    """A master, one replica and three sentinels (quorum 2) watching `mymaster`."""

    root: Path
    down_after_ms: int = 1000
    failover_timeout_ms: int = 5000
    service: str = "mymaster"
    servers: list[Node] = field(default_factory=list)
    sentinels: list[Node] = field(default_factory=list)

    def start(self) -> LocalSentinel:
        mport, rport = free_port(), free_port()
        master = Node(mport, _server_args(mport, self.root / "master", []), self.root / "master").start()
        replica = Node(rport, _server_args(rport, self.root / "replica", ["--replicaof", "127.0.0.1", str(mport)]),
                       self.root / "replica").start()
        self.servers = [master, replica]
        wait_for(lambda: replica_online(master), 30, "the replica in sync")
        for n in range(3):
            port, d = free_port(), self.root / f"sentinel-{n}"
            d.mkdir(parents=True)
            conf = d / "sentinel.conf"  # sentinels rewrite their config: one writable file each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {d}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {mport} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            self.sentinels.append(Node(port, ["redis-server", str(conf), "--sentinel"], d).start())
        wait_for(self._sentinels_ready, 30, "every sentinel to see the replica and the two other sentinels")
        return self

    def _sentinels_ready(self) -> bool:
        for s in self.sentinels:
            info = s.use(lambda r: r.sentinel_master(self.service))
            if int(info["num-other-sentinels"]) != 2 or int(info["num-slaves"]) < 1:
                return False
        return True

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def master(self) -> Node:
        """The server every sentinel names as master."""
        named = self._named()
        assert named is not None, "the sentinels disagree on the master"
        return named

    def _named(self) -> Node | None:
        ports = {int(s.use(lambda r: r.sentinel_get_master_addr_by_name(self.service))[1]) for s in self.sentinels}
        port = ports.pop() if len(ports) == 1 else None
        return next((n for n in self.servers if n.port == port), None)

    def wait_promoted(self, old: Node, timeout_s: float = 30.0) -> Node:
        def promoted() -> Node | None:
            new = self._named()
            if new is None or new.port == old.port:
                return None
            return new if new.use(lambda r: r.info("replication")["role"]) == "master" else None
        return wait_for(promoted, timeout_s, f"the sentinels to promote a replica in place of :{old.port}")

    def stop(self) -> None:
        for n in [*self.sentinels, *self.servers]:
            n.kill()
