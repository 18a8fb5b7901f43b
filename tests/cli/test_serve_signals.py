"""`lessserve serve` stops cleanly on SIGTERM and SIGINT (what Kubernetes, docker, systemd and a
terminal send): it drains, exits 0 without Ray's signal stack dump, and a fresh server against the
same Redis continues the conversation from the offloaded cache. Real CLI subprocesses, real Redis."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from lessserve.lab.served import ServeProcess
from lessserve.testing.local_redis import LocalRedis, free_port

MODEL = "smollm2-135m-instruct"


def serve(port: int, redis_url: str, log: Path) -> ServeProcess:
    return ServeProcess(port, ["--port", str(port), "--redis-url", redis_url, "--max-slots", "2"], log)


def chat(port: int, messages: list[dict]) -> dict:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"X-Session-Id": "sig-1"},
                   json={"model": MODEL, "messages": messages, "max_tokens": 6}, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def stop(server: ServeProcess, sig: int, budget_s: float) -> tuple[int, float]:
    try:
        return server.stop(sig, budget_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{signal.Signals(sig).name}: not stopped within {budget_s} s")


def test_sigterm_and_sigint_drain_exit_0_and_the_conversation_continues(tmp_path):
    port = free_port()
    with LocalRedis() as redis:
        msgs = [{"role": "user", "content": "Name a colour."}]
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        server = serve(port, redis.url, logs[0])
        try:
            server.wait_ready(240)
            first = chat(port, msgs)
        finally:
            rc, took = stop(server, signal.SIGTERM, budget_s=120)  # drain_timeout_s 60 + Ray shutdown
        assert rc == 0 and took < 120, (rc, took)
        msgs += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "Why that one?"}]
        server = serve(port, redis.url, logs[1])
        try:
            server.wait_ready(240)
            second = chat(port, msgs)
        finally:
            rc2, _ = stop(server, signal.SIGINT, budget_s=120)
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
