"""`lessserve serve` stops cleanly on SIGTERM and SIGINT (what Kubernetes, docker, systemd and a
terminal send): it drains, exits 0 without Ray's signal stack dump, and a fresh server against the
same Redis continues the conversation from the offloaded cache. Real CLI subprocesses, real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from lessserve.testing.local_redis import LocalRedis, free_port

MODEL = "smollm2-135m-instruct"


def serve(port: int, redis_url: str, log) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    return subprocess.Popen([sys.executable, "-m", "lessserve.cli.main", "serve", "--port", str(port),
                             "--redis-url", redis_url, "--max-slots", "2"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("server not ready")


def chat(port: int, messages: list[dict]) -> dict:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"X-Session-Id": "sig-1"},
                   json={"model": MODEL, "messages": messages, "max_tokens": 6}, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def stop(proc: subprocess.Popen, sig: int, budget_s: float) -> tuple[int, float]:
    t0 = time.time()
    proc.send_signal(sig)
    try:
        return proc.wait(budget_s), time.time() - t0
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{signal.Signals(sig).name}: not stopped within {budget_s} s")


def test_sigterm_and_sigint_drain_exit_0_and_the_conversation_continues(tmp_path):
    port = free_port()
    with LocalRedis() as redis:
        msgs = [{"role": "user", "content": "Name a colour."}]
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        with logs[0].open("w") as log:
            proc = serve(port, redis.url, log)
            try:
                wait_ready(proc, port)
                first = chat(port, msgs)
            finally:
                rc, took = stop(proc, signal.SIGTERM, budget_s=120)  # drain_timeout_s 60 + Ray shutdown
        assert rc == 0 and took < 120, (rc, took)
        msgs += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "Why that one?"}]
        with logs[1].open("w") as log:
            proc = serve(port, redis.url, log)
            try:
                wait_ready(proc, port)
                second = chat(port, msgs)
            finally:
                rc2, _ = stop(proc, signal.SIGINT, budget_s=120)
        assert rc2 == 0
    # the fresh server restored the drained cache: only the new messages were prefilled
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
    for path in logs:
        text = path.read_text()
        assert "SIGTERM received" not in text and "PC: @" not in text and "Traceback" not in text, text[-2000:]
        assert "draining" in text
    print(f"\nFAULT-TABLE | SIGTERM to lessserve serve (exit {rc} in {took:.0f} s), SIGINT to its successor (exit "
          f"{rc2}); the conversation continued with {second['usage']['prompt_tokens_details']['cached_tokens']} "
          "cached tokens | 2 | 0 | 0 | 1 of 1 |")
