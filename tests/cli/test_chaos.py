"""Chaos: conversations go on, turn after turn, while a schedule of faults hits a real `lessserve
serve` (its own local Ray, two workers, a real redis-server with AOF): Redis killed, Redis back
empty, Redis crashed and back from its AOF, a worker process SIGKILLed mid-turn, the server
SIGTERMed and replaced. Every response is 200 or a documented 503 (with Retry-After); every
conversation completes; every session's recorded turns equal its conversation's.

The default run has the short schedule (one fault per round); `-m long` runs it twice as long
with more conversations."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import threading
import time
import uuid

import httpx
import pytest

from lessserve.testing.local_redis import LocalRedis, free_port
from tests.cli.servers import MODEL, Server

QUESTIONS = ["Name a colour.", "Name a fruit of that colour.", "Is it sweet?", "Where does it grow?",
             "Name another one.", "Thanks!", "One more fruit?", "Bye."]


class Client:
    """One conversation; honours 503 + Retry-After and waits out a restarting server (bounded)."""

    def __init__(self, url: str, deadline: float):
        self.url, self.sid, self.deadline = url, f"chaos-{uuid.uuid4().hex[:8]}", deadline
        self.msgs: list[dict] = []
        self.statuses: list[int] = []
        self.last: dict = {}

    def turn(self, i: int) -> None:
        self.msgs.append({"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]})
        while time.time() < self.deadline:
            try:
                r = httpx.post(self.url + "/v1/chat/completions", headers={"X-Session-Id": self.sid}, timeout=300,
                               json={"model": MODEL, "messages": self.msgs, "max_tokens": 5})
            except httpx.TransportError:  # the server is being replaced: no response, try again
                time.sleep(1)
                continue
            self.statuses.append(r.status_code)
            if r.status_code == 503 and r.headers.get("retry-after"):
                time.sleep(float(r.headers["retry-after"]))
                continue
            assert r.status_code == 200, (self.sid, r.status_code, r.text)
            self.last = r.json()
            self.msgs.append({"role": "assistant", "content": self.last["choices"][0]["message"]["content"]})
            return
        pytest.fail(f"{self.sid}: turn {i} did not complete in time ({self.statuses[-5:]})")


def kill_a_worker_soon(server: Server, after_s: float) -> threading.Thread:
    def kill():
        time.sleep(after_s)
        pids = server.worker_pids()
        assert pids, "no worker process found"
        os.kill(pids[0], signal.SIGKILL)

    t = threading.Thread(target=kill, daemon=True)
    t.start()
    return t


def run_chaos(tmp_path, conversations: int, cycles: int) -> dict:
    redis = LocalRedis(persist=True).start()
    server = Server(free_port(), redis.url, tmp_path / "serve.log", workers={"min_workers": 2, "max_workers": 2},
                    maintain_interval_s=1.0, drain_timeout_s=20)
    server.start()
    deadline = time.time() + 1500
    clients = [Client(server.url, deadline) for _ in range(conversations)]
    faults = []
    try:
        def round_(i: int, during=None) -> None:
            with cf.ThreadPoolExecutor(conversations) as pool:
                futs = [pool.submit(c.turn, i) for c in clients]
                if during:
                    during()
                for f in futs:
                    f.result(timeout=600)
            for c in clients:  # after every round, not just at the end: the failing fault is named
                st = httpx.get(f"{server.url}/v1/sessions/{c.sid}", timeout=60).json()
                assert st["turns"] == i + 1, (c.sid, st, faults)

        i = 0
        round_(i)
        for _ in range(cycles):
            redis.kill()
            faults.append("redis killed")
            round_(i := i + 1)
            redis.restart(empty=True)
            faults.append("redis back empty")
            time.sleep(2.5)  # a maintenance pass: workers re-publish what they hold
            round_(i := i + 1)
            redis.restart()
            faults.append("redis crashed, back from its AOF")
            round_(i := i + 1)
            killer: list[threading.Thread] = []
            faults.append("a worker SIGKILLed mid-turn")
            round_(i := i + 1, during=lambda k=killer: k.append(kill_a_worker_soon(server, 0.5)))
            killer[0].join(30)
            rc, took = server.stop(signal.SIGTERM)
            assert rc == 0, (rc, server.log.read_text()[-3000:])
            faults.append(f"server SIGTERMed (exit {rc} in {took:.0f} s) and replaced")
            server.start()
            round_(i := i + 1)
        turns = i + 1
        recorded = {c.sid: httpx.get(f"{server.url}/v1/sessions/{c.sid}", timeout=60).json() for c in clients}
    finally:
        if server.proc and server.proc.poll() is None:
            server.stop(signal.SIGTERM)
        redis.stop()
    return {"clients": clients, "turns": turns, "recorded": recorded, "faults": faults,
            "log": server.log.read_text()}


def check(res: dict) -> None:
    from lessserve.workers.chat_session import encode, render
    from lessserve.workers.model_loader import load_tokenizer, resolve_model_folder

    tok = load_tokenizer(resolve_model_folder(MODEL)[1])
    statuses = [s for c in res["clients"] for s in c.statuses]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    for c in res["clients"]:
        assert len(c.msgs) == 2 * res["turns"], c.sid
        st = res["recorded"][c.sid]
        assert st["turns"] == res["turns"], (c.sid, st, res["faults"])
        # the last turn's cache held exactly the conversation the client sent (a lost or doubled
        # message would be off by a whole message; re-tokenised replies may differ by a token or two)
        want = len(encode(tok, render(tok, c.msgs[:-1])))
        assert abs(c.last["usage"]["prompt_tokens"] - want) <= 2 * res["turns"], (c.last["usage"], want)
    assert "SIGTERM received" not in res["log"]
    print(f"\nFAULT-TABLE | chaos: {'; '.join(res['faults'])} | {len(statuses)} | "
          f"{sum(x >= 500 and x != 503 for x in statuses)} | {statuses.count(503)} | "
          f"{len(res['clients'])} of {len(res['clients'])} |")


def test_chaos_short(tmp_path):
    check(run_chaos(tmp_path, conversations=3, cycles=1))


@pytest.mark.long
def test_chaos_long(tmp_path):
    check(run_chaos(tmp_path, conversations=6, cycles=2))
