"""`lessserve serve` as a real subprocess for tests: start, wait until ready, stop by signal, and
find its worker replica processes (descendants of the server we started, by PID)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import psutil
import yaml

from lessserve.lab.served import ServeProcess

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
        self.server = ServeProcess(self.port, ["--config", str(self.config), *flags], self.log, env)
        self.proc = self.server.proc
        try:
            self.server.wait_ready(timeout)
        except TimeoutError:
            self.stop(signal.SIGKILL)
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM, budget_s: float = 150) -> tuple[int, float]:
        return self.server.stop(sig, budget_s)

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
