"""`lessserve serve` as a process of its own on 127.0.0.1 (its own local Ray): started with the given
flags, waited for until /readyz answers, stopped by a signal to the PID started here (never by
name). Used by `lessserve eval harness` and by the CLI tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


class ServeProcess:
    def __init__(self, port: int, flags: Sequence[str], log: Path, env: dict[str, str] | None = None):
        """`flags` follow `lessserve serve`; `env` goes on top of this process's environment; the
        server's output is appended to `log`."""
        self.url, self.log = f"http://127.0.0.1:{port}", log
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "", **(env or {})}
        with log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "lessserve.cli.main", "serve", *flags],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """RuntimeError if the server exits first, TimeoutError if it is not ready in time (both
        with the end of its log); the process is left running on a timeout."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the server at {self.url} did not become ready in {timeout_s:.0f} s: {self.tail()}")

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, sig: int = signal.SIGTERM, budget_s: float = 150) -> tuple[int, float]:
        """Send `sig` and wait up to `budget_s`: (exit code, seconds). Past the budget the process is
        killed and subprocess.TimeoutExpired raised. A server that already exited: (its code, 0)."""
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        t0 = time.time()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(budget_s), time.time() - t0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
