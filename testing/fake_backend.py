"""The router's deps in memory, for testing its HTTP logic without Ray or a model:
`FakeBackend` (a TurnBackend whose "model" echoes the last user message, word by word), and a
metrics sink, session directory, response records and health probe held in dicts.

    app = build_router_app(cfg, fake_deps())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client: ...

The fake keeps sessions as the workers do in the ways the router can see: an owner per session,
the history a session's cache has consumed (a turn that extends it prefills only the new words,
reported as `cached` tokens), forks copying a parent, ephemeral and one-off sessions forgotten
after their turn. A "token" is one whitespace-separated word.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from lessserve.cache_store.kv import MemoryKV
from lessserve.cluster.http_errors import HttpError
from lessserve.cluster.protocol import (
    EndEvent,
    ErrorEvent,
    Event,
    PromptEvent,
    StartEvent,
    TokenEvent,
    TokenLogprob,
    TurnRequest,
)
from lessserve.cluster.responses import ResponseStore
from lessserve.cluster.router import RouterDeps


def words(messages: list[dict]) -> list[str]:
    return [w for m in messages for w in (m["role"] + ":", *m["content"].split())]


def echo(req: TurnRequest) -> list[str]:
    """The fake model's reply: "echo" and the last user message's (or the prompt's) words, as tokens."""
    last = req.messages[-1]["content"] if req.messages else prompt_text(req.prompt)
    return [f"{w} " for w in ["echo", *last.split()]]


def prompt_text(prompt: str | list[int]) -> str:
    """A completion's prompt as words (token ids are words of digits)."""
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


def fake_logprob(piece: str, k: int) -> TokenLogprob:
    """A word's made-up logprob: -1, and k alternatives below it."""
    return piece, -1.0, tuple(piece.encode()), tuple((f"alt{j} ", -2.0 - j) for j in range(k))


@dataclass
class FakeSession:
    owner: str
    history: list[dict] = field(default_factory=list)  # what the cache has consumed, replies included
    turns: int = 0


class FakeBackend:
    def __init__(self):
        self.sessions: dict[str, FakeSession] = {}
        self.requests: list[TurnRequest] = []  # every turn the router asked for, in order
        self.faults: list[tuple[int, HttpError]] = []  # (tokens first, error) for the next turns
        self.hold: asyncio.Event | None = None  # when set to an Event: turns wait for it after their start

    def fail_next(self, error: HttpError, after_tokens: int = 0) -> None:
        """The next turn reports `error`: instead of its start (0), or after that many tokens."""
        self.faults.append((after_tokens, error))

    async def turn(self, req: TurnRequest, *, stream: bool) -> AsyncIterator[Event]:
        self.requests.append(req)
        fault = self.faults.pop(0) if self.faults else None
        sid = req.session_id
        known = self.sessions.get(sid) if sid else None
        if known and known.owner != req.owner:
            yield ErrorEvent(HttpError(404, "not_found_error", "not_found", f"session {sid!r} not found"))
            return
        if fault and fault[0] == 0:
            yield ErrorEvent(fault[1])
            return
        if req.auto_tools:  # the fake's chat template renders no tools, as the default model's
            yield ErrorEvent(HttpError(400, "invalid_request_error", None, "tool_choice: 'auto' needs a chat "
                                       "template that renders tools; this model's renders none"))
            return
        if known is None and req.fork_from in self.sessions and self.sessions[req.fork_from].owner == req.owner:
            parent = self.sessions[req.fork_from]
            known = FakeSession(req.owner, list(parent.history), parent.turns)
        known = known or FakeSession(req.owner)
        prompt = words(req.messages) if req.messages else prompt_text(req.prompt).split()
        held = words(known.history)
        cached = len(held) if prompt[:len(held)] == held else 0
        reply = echo(req)[:req.max_tokens]
        yield StartEvent(prompt_tokens=len(prompt), prefilled=len(prompt) - cached)
        if req.echo:
            k = req.prompt_logprobs
            yield PromptEvent(" ".join(prompt), tuple(prompt), () if k is None else
                              (None, *(fake_logprob(w, k) for w in prompt[1:])))
        if self.hold is not None:
            await self.hold.wait()
        for i, piece in enumerate(reply):
            if fault and fault[0] == i:
                yield ErrorEvent(fault[1])
                return
            await asyncio.sleep(0)
            for c in range(req.n):  # every choice says the same (the fake samples nothing)
                lps = () if req.logprobs is None else (fake_logprob(piece, req.logprobs),)
                yield TokenEvent(piece, c, lps)
        text = "".join(reply)
        if sid and not req.ephemeral:
            known.history = [*req.messages, {"role": "assistant", "content": text}]
            known.turns += 1
            self.sessions[sid] = known
        for c in range(req.n):
            yield EndEvent("length" if len(reply) < len(echo(req)) else "stop", len(reply), c)

    async def session_info(self, session_id: str, owner: str) -> dict | None:
        s = self.sessions.get(session_id)
        if s is None or s.owner != owner:
            return None
        n = len(words(s.history))
        return {"id": session_id, "worker": "fake-worker", "node": None, "tier": "device", "tokens_seen": n,
                "cached_tokens": n, "cache_bytes": 0, "turns": s.turns}

    async def delete_session(self, session_id: str, owner: str) -> bool:
        s = self.sessions.get(session_id)
        if s is None or s.owner != owner:
            return False
        del self.sessions[session_id]
        return True


class MemoryMetrics:
    def __init__(self):
        self.requests: list[tuple] = []
        self.errors: list[int] = []
        self.retries = 0

    def record_request(self, ttft: float | None, itls: list[float], tokens_out: int, prefilled: int) -> None:
        self.requests.append((ttft, itls, tokens_out, prefilled))

    def record_error(self, status: int) -> None:
        self.errors.append(status)

    def record_retry(self) -> None:
        self.retries += 1

    async def prometheus(self) -> str:
        return f"lessserve_requests_total {len(self.requests)}\n"


class MemoryDirectory:
    """session id -> {"worker", "owner"}, entered by the test; `count` also sees the sessions the
    fake backend holds (`sessions`), as the real directory sees every placed session."""

    def __init__(self, entries: dict | None = None, sessions: dict | None = None):
        self.entries = entries if entries is not None else {}
        self.sessions = sessions if sessions is not None else {}

    async def lookup(self, sid: str) -> dict | None:
        if sid in self.entries:
            return self.entries[sid]
        held = self.sessions.get(sid)
        return None if held is None else {"worker": "fake-worker", "owner": held.owner}

    async def count(self, sid_prefix: str) -> tuple[int, int]:
        return sum(1 for sid in {*self.entries, *self.sessions} if sid.startswith(sid_prefix)), 0


class StaticHealth:
    def __init__(self, workers: int = 1):
        self.workers = workers

    async def check(self) -> dict:
        return {"status": "ok", "reasons": [], "workers": self.workers}


def fake_deps(backend: FakeBackend | None = None) -> RouterDeps:
    backend = backend or FakeBackend()
    return RouterDeps(backend=backend, metrics=MemoryMetrics(), directory=MemoryDirectory(sessions=backend.sessions),
                      responses=ResponseStore(MemoryKV(), ttl_s=3600, max_records=1000), health=StaticHealth())
