"""Hostile and unlucky clients against the real cluster (Ray Serve, two workers, a real redis-server,
the default model): Redis SIGSTOPped mid-stream, a storm of clients gone before their first token,
concurrent turns on one session. Loopback only; every loop bounded in count and time."""

from __future__ import annotations

import concurrent.futures as cf
import re
import socket
import time
import uuid
from urllib.parse import urlsplit

import httpx

from tests.cluster.conftest import KEY_A

MODEL = "smollm2-135m-instruct"
H = {"Authorization": f"Bearer {KEY_A}"}


def sid() -> str:
    return f"h-{uuid.uuid4().hex[:10]}"


def body(text: str, max_tokens: int = 8, stream: bool = False, history: list | None = None) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "stream": stream,
            "messages": [*(history or []), {"role": "user", "content": text}]}


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_redis_sigstopped_mid_stream_never_stalls_the_tokens(cluster):
    """Decoding never waits on Redis: a stream whose Redis hangs after its first tokens keeps its
    inter-token gaps, ends 200, and the conversation goes on once Redis is back (0 5xx)."""
    url, redis, s = cluster["url"], cluster["redis"], sid()
    first = httpx.post(url + "/v1/chat/completions", json=body("Name a colour."), timeout=300,
                       headers={**H, "X-Session-Id": s})
    assert first.status_code == 200
    history = [{"role": "user", "content": "Name a colour."},
               {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]}]
    stamps, paused_at = [], None
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", headers={**H, "X-Session-Id": s}, timeout=300,
                          json=body("Tell me a long story about it.", max_tokens=40, stream=True,
                                    history=history)) as r:
            status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    stamps.append(time.perf_counter())
                    if len(stamps) == 3:
                        redis.pause()  # SIGSTOP: connections stay open, nothing answers
                        paused_at = len(stamps)
    finally:
        redis.resume()
    gaps = [b - a for a, b in zip(stamps[paused_at - 1:], stamps[paused_at:], strict=False)]
    assert status == 200 and paused_at == 3 and len(gaps) >= 20, (status, len(stamps))
    assert max(gaps) < 2.0, f"a token waited {max(gaps):.2f} s on the hung Redis"
    again = httpx.post(url + "/v1/chat/completions", json=body("And another?", history=history), timeout=300,
                       headers={**H, "X-Session-Id": s})
    assert again.status_code == 200


def test_a_storm_of_clients_gone_before_their_first_token_frees_every_slot(cluster):
    """24 clients send a streamed turn on their own session and hang up at once (raw sockets, no
    reading): once the storm settles no turn holds a slot, and a full round of sessions runs."""
    url = cluster["url"]
    host, port = urlsplit(url).hostname, urlsplit(url).port
    for i in range(24):
        payload = httpx.Request("POST", url + "/v1/chat/completions",
                                headers={**H, "X-Session-Id": sid(), "Content-Type": "application/json"},
                                json=body(f"Count to {100 + i}.", max_tokens=64, stream=True))
        raw = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in payload.headers.items() if k.lower() != "host")
               + "\r\n").encode() + payload.read()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(raw)  # and close: the client is gone before any token
    end = time.time() + 120
    while (running := metric(url, "lessserve_turns_running")) and time.time() < end:
        time.sleep(0.5)
    assert running == 0, f"{running} turns still hold a slot after the storm"
    slots = cluster["cfg"]["engine"]["max_slots"] * cluster["cfg"]["workers"]["max_workers"]

    def turn(i: int) -> int:
        return httpx.post(url + "/v1/chat/completions", json=body(f"Say {i}.", max_tokens=2), timeout=300,
                          headers={**H, "X-Session-Id": sid()}).status_code

    with cf.ThreadPoolExecutor(slots) as pool:
        assert list(pool.map(turn, range(slots))) == [200] * slots


def test_concurrent_turns_on_one_session_run_one_after_the_other_on_its_worker(cluster):
    """Four requests for one session at once: all 200, on one worker, and the session ends exactly
    as one turn of that history leaves it (no state of two turns mixed in one slot)."""
    url, s = cluster["url"], sid()
    msgs = body("Name three rivers.", max_tokens=6)

    def turn(_: int) -> httpx.Response:
        return httpx.post(url + "/v1/chat/completions", json=msgs, headers={**H, "X-Session-Id": s}, timeout=300)

    with cf.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(turn, range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    texts = {r.json()["choices"][0]["message"]["content"] for r in replies}
    assert len(texts) == 1  # the same history, greedy: the same reply each time, whatever ran before it
    info = httpx.get(f"{url}/v1/sessions/{s}", headers=H, timeout=60).json()
    usage, finish = replies[0].json()["usage"], replies[0].json()["choices"][0]["finish_reason"]
    assert info["turns"] == 1
    # one turn's state: the prompt and the reply, less its last token (never fed back) unless a stop id ended it
    assert info["tokens_seen"] == usage["prompt_tokens"] + usage["completion_tokens"] - (finish == "length")
