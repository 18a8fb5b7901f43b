"""Chat sessions driven from synchronous code: `lessserve chat`, evaluations, benchmarks and tests.

The same pieces as a worker, minus Ray: a SessionStore whose slab belongs to a BatchScheduler's
thread (reached through `run_exclusive`, between steps) and whose coroutines run on a private event
loop of the calling thread (asyncio.Runner). A turn is the store's turn API around the scheduler's
generation, with the worker's token-to-text rules (workers/reply.py).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Iterator, Sequence
from typing import TypeVar

from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.kv import KV
from lessserve.workers.engine import Engine
from lessserve.workers.reply import Reply
from lessserve.workers.scheduler import BatchScheduler, SamplingParams
from lessserve.workers.session_store import SessionStore

T = TypeVar("T")


class LocalSessions:
    """Every coroutine method of the store is a plain method here; every other attribute is the
    store's own. Inspecting the store's slab-side state (`device`, `sessions`) from the calling
    thread is safe only between turns: the scheduler thread is idle then."""

    def __init__(self, engine: Engine, config: StoreConfig | None = None, kv: KV | None = None,
                 threads: int | None = None):
        self.scheduler = BatchScheduler(engine, threads=threads)
        self.runner = asyncio.Runner()
        self.inner = SessionStore(engine, config, kv=kv, run_local=self.scheduler.run_exclusive)

    def run(self, aw: Awaitable[T]) -> T:
        async def wait() -> T:
            return await aw

        return self.runner.run(wait())

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if inspect.iscoroutinefunction(attr):
            return lambda *a, **kw: self.run(attr(*a, **kw))
        return attr

    def turn(self, session_id: str, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
             owner: str | None = None) -> Iterator[str]:
        """One assistant turn for the full message history; yields the reply's text. The turn is
        closed with every sampled token whatever ends it (a consumer that stops early included)."""
        engine = self.inner.engine
        session, new_ids = self.open_turn(session_id, messages, max_new_tokens, owner)
        tokens: list[int] = []
        try:
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed, stop_ids=engine.stop_ids)
            reply = Reply(engine.tokenizer, engine.stop_ids, stop)
            yield from reply.pieces(self.scheduler.stream(session.slot, new_ids, params, tokens, session.marks))
        finally:
            self.close_turn(session_id, messages, tokens)

    def close(self) -> None:
        try:
            self.run(self.inner.close())
        finally:
            self.runner.close()
            self.scheduler.close()

    def __enter__(self) -> LocalSessions:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
