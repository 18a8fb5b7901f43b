"""Driving a SessionStore from synchronous code (tests, benchmarks): a whole turn through
Engine.generate over the store's one turn API, and inspection that the serving path never needs."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Iterator
from typing import TypeVar

from lessserve.cache_store.codec import read_header
from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.kv import KV
from lessserve.workers.chat_session import ChatSession, stream_reply
from lessserve.workers.engine import Engine
from lessserve.workers.session_store import SessionStore, meta_transcript

T = TypeVar("T")


class SyncSessions:
    """A SessionStore whose coroutines run on a private event loop (asyncio.Runner) of the calling
    thread, which also owns the engine (the store's `run_local` is inline). Every coroutine method
    of the store is a plain method here; every other attribute is the store's own."""

    def __init__(self, engine: Engine, config: StoreConfig | None = None, kv: KV | None = None):
        self.runner = asyncio.Runner()
        self.inner = SessionStore(engine, config, kv=kv)

    def run(self, aw: Awaitable[T]) -> T:
        async def wait() -> T:
            return await aw

        return self.runner.run(wait())

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if inspect.iscoroutinefunction(attr):
            return lambda *a, **kw: self.run(attr(*a, **kw))
        return attr

    def close(self) -> None:
        try:
            self.run(self.inner.close())
        finally:
            self.runner.close()


def run_turn(ss: SyncSessions, session_id: str, messages: list[dict], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
    """One assistant turn for the full message history; yields text pieces. open_turn / close_turn
    bracket the generation exactly as the worker's scheduler does (close_turn runs whatever happens)."""
    chat, new_ids = ss.open_turn(session_id, messages, max_new_tokens)
    gen: list[int] = []
    try:
        yield from stream_reply(chat, new_ids, gen, max_new_tokens, temperature, top_p, seed)
    finally:
        ss.close_turn(session_id, messages, gen)


def snapshot(ss: SyncSessions, session_id: str) -> bytes:
    """The session's device cache, encoded (transcript inside), without moving it."""
    return bytes(ss.device.get(session_id))


def adopt(ss: SyncSessions, session_id: str, blob: bytes) -> None:
    """Load an encoded cache (from `snapshot`, or another worker) into a device slot."""
    tr = meta_transcript(read_header(blob).meta)
    if session_id not in ss.device.slots:
        ss.run(ss.store.make_room())
    ss.device.put(session_id, blob)
    ss.store.admit(session_id)
    ss.sessions[session_id] = ChatSession(ss.engine, slot=ss.device.slot_of(session_id), transcript=tr)


def forget_cache(ss: SyncSessions, session_id: str) -> None:
    """Drop the session's cache in every tier but keep its transcript (the next turn recomputes)."""
    ss.run(ss.store.forget_cache(session_id))
