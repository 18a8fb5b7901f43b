"""`lessserve serve` as a real subprocess for tests: start, wait until ready, stop by signal, and
find its worker replica processes (descendants of the server we started, by PID)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

MODEL = "smollm2-135m-instruct"


class Server:
    def __init__(self, port: int, redis_url: str, log: Path, **config):
        self.port, self.url, self.log = port, f"http://127.0.0.1:{port}", log
        cfg = {"port": port, "store": {"redis_url": redis_url}, "router_num_cpus": 0.1, "worker_num_cpus": 0.5,
               "engine": {"max_slots": 4}, **config}
        self.config = log.with_suffix(".yaml")
        self.config.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300, flags: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Server:
        """`flags` go after --config (they win over it), `env` on top of this process's environment."""
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "", **(env or {})}
        with self.log.open("a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "lessserve.cli.main", "serve", "--config",
                                          str(self.config), *flags], stdout=out, stderr=subprocess.STDOUT, env=env)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop(signal.SIGKILL)
        raise TimeoutError("server not ready")

    def stop(self, sig: int = signal.SIGTERM, budget_s: float = 150) -> tuple[int, float]:
        t0 = time.time()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(budget_s), time.time() - t0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def worker_pids(self) -> list[int]:
        """PIDs of this server's LessWorker replica processes."""
        out = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "LessWorker" in " ".join(p.cmdline()):
                    out.append(p.pid)
            except psutil.Error:
                continue
        return out
