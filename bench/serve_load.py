"""A bounded multi-turn chat load against the cluster on 127.0.0.1: N users, K turns each, Poisson
arrivals, turn lengths drawn from a long-tailed (log-normal) distribution like real chat logs.

Configurations: (a) sessions with compressed caches (X-Session-Id: only new tokens prefilled),
(b) no session cache (no session id: every turn re-prefills its whole history, as a plain
transformers server would). Every request loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import httpx

from lessserve.cluster.metrics import TokenTimer
from lessserve.errors.tree import LessServeError


class TurnFailed(LessServeError):
    """A turn answered with an HTTP error (status, the server's Retry-After if any)."""

    def __init__(self, status: int, retry_after: str | None, text: str):
        super().__init__(f"HTTP {status}: {text}")
        self.status, self.retry_after = status, float(retry_after) if retry_after else None

    def __reduce__(self):
        return type(self), (self.status, str(self.retry_after) if self.retry_after else None, str(self))


WORDS = ("river stone market window garden letter music winter harbor forest candle bridge story "
         "morning engine silver island paper orchard lantern").split()


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def user_script(rng: random.Random, turns: int) -> list[str]:
    """Messages of log-normal length (median ~45 words, long tail as in chat logs), capped at 400."""
    out = []
    for _ in range(turns):
        n = max(3, min(400, int(rng.lognormvariate(3.8, 0.8))))
        out.append("Tell me about " + " ".join(rng.choice(WORDS) for _ in range(n)) + ".")
    return out


async def _turn(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], session: str | None,
                max_tokens: int, headers: dict) -> tuple[str, float | None, list[float]]:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    hdr = dict(headers)
    if session:
        hdr["X-Session-Id"] = session
    timer, text = TokenTimer(time.perf_counter()), []
    async with client.stream("POST", url, json=body, headers=hdr) as r:
        if r.status_code != 200:
            await r.aread()
            raise TurnFailed(r.status_code, r.headers.get("retry-after"), r.text[:200])
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            piece = ch["choices"][0]["delta"].get("content") if ch.get("choices") else None
            if piece:
                timer.tick()
                text.append(piece)
    return "".join(text), timer.ttft, timer.itls


async def run_load(base_url: str, model: str, users: int, turns: int, rate: float, max_tokens: int,
                   use_sessions: bool, seed: int, time_limit_s: float, headers: dict | None = None,
                   tag: str = "") -> dict:
    rng = random.Random(seed)
    scripts = [user_script(rng, turns) for _ in range(users)]
    starts, t = [], 0.0
    for _ in range(users):  # Poisson arrivals of users
        t += rng.expovariate(rate)
        starts.append(t)
    ttfts, itls, done, errors = [], [], 0, 0
    deadline = time.perf_counter() + time_limit_s
    url = base_url.rstrip("/") + "/v1/chat/completions"

    async def user(i: int, client: httpx.AsyncClient):
        nonlocal done, errors
        await asyncio.sleep(starts[i])
        msgs: list[dict] = []
        sid = f"bench-{tag}-{seed}-{i}" if use_sessions else None
        for q in scripts[i]:
            if time.perf_counter() > deadline:
                return
            msgs.append({"role": "user", "content": q})
            try:
                text, ttft, itl = await _turn(client, url, model, msgs, sid, max_tokens, headers or {})
            except (httpx.HTTPError, TurnFailed):
                errors += 1
                return
            msgs.append({"role": "assistant", "content": text})
            done += 1
            if ttft is not None:
                ttfts.append(ttft)
            itls.extend(itl)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit_s + 60)) as client:
        tasks = [asyncio.create_task(user(i, client)) for i in range(users)]
        _, pending = await asyncio.wait(tasks, timeout=time_limit_s)
        for t in pending:  # the time bound: turns still running are abandoned, not counted
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - t0
    return {"turns": done, "errors": errors, "abandoned_users": len(pending), "wall_s": wall,
            "turns_per_s": done / wall,
            "ttft_p50_s": _percentile(ttfts, 0.5), "ttft_p99_s": _percentile(ttfts, 0.99),
            "itl_p50_s": _percentile(itls, 0.5), "itl_p99_s": _percentile(itls, 0.99),
            "ttft_mean_s": statistics.fmean(ttfts) if ttfts else float("nan")}
