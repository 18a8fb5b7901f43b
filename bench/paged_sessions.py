"""Chat sessions over a PagedEngine with whole-session LRU eviction: the serving side of
`bench serve`'s paged full-KV competitor (vLLM / SGLang automatic prefix caching, per session).

- A session owns its blocks between turns (its full K/V: every token, exact).
- A turn is admitted when blocks for its whole length (history + new ids + max_new_tokens,
  rounded up to blocks) can be reserved. Free blocks first, then whole idle sessions are evicted,
  least recently used first; a session with a turn in flight is never evicted. When that is not
  enough yet, the turn waits (first come, first served) until a turn in flight ends. No turn is
  preempted mid-way.
- An evicted session's next turn recomputes: its transcript's ids (exactly the tokens its cache had
  consumed) are prefilled again ahead of the turn's new ids, like a prefix-cache miss.
- A turn longer than the whole pool cannot be served at all: TurnTooLongError (vLLM ignores such a
  prompt: it "exceeds the capacity of block_manager").

`turn()` has SessionStore.turn's shape, so `bench serve`'s driver runs every configuration alike.
State lives on the engine's thread: every mutation runs through `run_local` (the scheduler's
`run_exclusive`), between forward passes; admission order is kept on the caller's event loop.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from lessserve.bench.paged_kv import PagedEngine
from lessserve.cache_store.lru import LRU
from lessserve.cache_store.store import RunLocal, run_inline
from lessserve.errors.tree import RequestError
from lessserve.workers.chat_session import Transcript, plan_turn
from lessserve.workers.session_store import turn_scope


class TurnTooLongError(RequestError):
    """The turn needs more blocks than the whole pool holds."""


@dataclass
class PagedSession:
    """What the driver reads of a session: its sequence (`slot`, None while evicted) and transcript."""

    slot: int | None = None
    transcript: Transcript = field(default_factory=Transcript)
    before: Transcript | None = None  # the transcript when the open turn began (rolled back if it fails)


class PagedSessions:
    def __init__(self, engine: PagedEngine, run_local: RunLocal = run_inline):
        self.engine = engine
        self.run_local = run_local
        self.sessions: dict[str, PagedSession] = {}
        self._tick = itertools.count()
        self.lru = LRU(clock=lambda: next(self._tick))  # resident sessions, least recently used first
        self.pinned: set[str] = set()  # sessions with a turn in flight
        self.recomputes = 0  # turns that re-prefilled an evicted session's history
        self.evictions = 0
        self.held_max = 0  # most sessions resident at once
        self._admit = asyncio.Lock()  # first come, first served
        self._changed: asyncio.Event | None = None  # set when a turn ends (blocks may be free)

    # --- the turn -------------------------------------------------------------------------------
    def turn(self, session_id: str, messages: list[dict],
             max_new_tokens: int = 0) -> AbstractAsyncContextManager[tuple[PagedSession, list[int], list[int]]]:
        """Yields (session, ids to prefill, tokens), as SessionStore.turn (`turn_scope`)."""
        return turn_scope(self.open_turn(session_id, messages, max_new_tokens),
                          lambda tokens: self.close_turn(session_id, messages, tokens))

    async def open_turn(self, sid: str, messages: list[dict], max_new_tokens: int) -> tuple[PagedSession, list[int]]:
        """Admit the turn (reserve its blocks, evicting idle sessions LRU), waiting for turns in
        flight to end while the pool cannot hold it yet; returns the session and the ids to prefill."""
        async with self._admit:
            while True:
                changed = self._changed = self._changed or asyncio.Event()
                out = await self.run_local(lambda: self._local_open(sid, messages, max_new_tokens))
                if out is not None:
                    return out
                await changed.wait()

    def _local_open(self, sid: str, messages: list[dict], max_new: int) -> tuple[PagedSession, list[int]] | None:
        eng = self.engine
        chat = self.sessions.setdefault(sid, PagedSession())
        tr = chat.transcript
        plan = plan_turn(eng.tokenizer, tr, messages)
        if plan.rebuild and chat.slot is not None:  # the history diverged: its cache is of no use
            self._drop(sid)
        if chat.slot is None:
            held = 0
            ids = ([] if plan.rebuild else list(tr.ids)) + plan.new_ids  # an evicted history is recomputed
        else:
            held = eng.seen[chat.slot]
            ids = plan.new_ids
        total = held + len(ids) + max_new
        need = eng.blocks_for(total)
        if need > eng.pool.num_blocks:
            raise TurnTooLongError(f"the turn needs {total} tokens of K/V ({need} blocks of {eng.cfg.block_tokens}); "
                                   f"the pool holds {eng.pool.num_blocks} blocks")
        if total > eng.max_model_len:
            raise TurnTooLongError(f"the conversation would reach {total} tokens; max_model_len={eng.max_model_len}")
        more = need - (len(eng.blocks[chat.slot]) if chat.slot is not None else 0)
        victims = [v for v in self.lru.victims(self.pinned) if v != sid]
        room, take = eng.pool.free_blocks, 0
        while room < more and take < len(victims):
            room += len(eng.blocks[self.sessions[victims[take]].slot])
            take += 1
        if room < more:
            return None  # turns in flight hold the blocks: wait for one to end
        for v in victims[:take]:
            self._evict(v)
        if chat.slot is None:
            chat.slot = eng.alloc()
            self.recomputes += bool(tr.ids and not plan.rebuild)
        try:
            eng.reserve(chat.slot, total)
        except BaseException:
            self._drop(sid)
            raise
        chat.before = copy.deepcopy(tr)
        if plan.rebuild:
            tr.ids, tr.text = [], ""
        tr.ids += plan.new_ids
        tr.text = plan.prompt_text
        self.pinned.add(sid)
        self.lru.touch(sid)
        self.held_max = max(self.held_max, len(self.lru))
        return chat, ids

    async def close_turn(self, sid: str, messages: list[dict], tokens: list[int]) -> None:
        await self.run_local(lambda: self._local_close(sid, messages, tokens))
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _local_close(self, sid: str, messages: list[dict], tokens: list[int]) -> None:
        """Record the turn (the cache consumed tokens[:-1], as ChatSession.finish_turn records), unpin,
        give back the blocks reserved past it. A turn that produced nothing is rolled back and its
        cache dropped (the next turn recomputes from the transcript)."""
        chat, eng = self.sessions.get(sid), self.engine
        if chat is None or chat.before is None:
            return
        before, chat.before = chat.before, None
        self.pinned.discard(sid)
        if not tokens:
            chat.transcript = before
            self._drop(sid)
            return
        tok, tr = eng.tokenizer, chat.transcript
        reply = tok.decode([t for t in tokens if t not in eng.stop_ids], skip_special_tokens=True)
        tr.ids += tokens[:-1]
        tr.text += tok.decode(tokens[:-1], skip_special_tokens=False)
        tr.messages = [*messages, {"role": "assistant", "content": reply}]
        tr.turns = sum(1 for m in messages if m.get("role") == "user")
        if eng.seen[chat.slot] != len(tr.ids):  # the scheduler consumed what the transcript says, or no cache
            self._drop(sid)
            return
        eng.trim(chat.slot)
        self.lru.touch(sid)

    # --- residency ------------------------------------------------------------------------------
    def _evict(self, sid: str) -> None:
        self._drop(sid)
        self.evictions += 1

    def _drop(self, sid: str) -> None:
        chat = self.sessions[sid]
        if chat.slot is not None:
            self.engine.free(chat.slot)
            chat.slot = None
        self.lru.forget(sid)

    def held(self) -> int:
        """Sessions whose K/V is resident now."""
        return len(self.lru)

    def reset_counts(self) -> None:
        """Counters from now on (after a warm-up turn)."""
        self.recomputes = self.evictions = 0
        self.held_max = self.held()

    async def delete(self, sid: str) -> bool:
        def drop() -> bool:
            if sid not in self.sessions or sid in self.pinned:
                return False
            self._drop(sid)
            del self.sessions[sid]
            return True

        return await self.run_local(drop)

    async def stats(self) -> dict:
        def read() -> dict:
            pool = self.engine.pool
            return {"sessions_held": self.held(), "sessions_held_max": self.held_max, "recomputes": self.recomputes,
                    "evictions": self.evictions, "blocks_used": pool.used_blocks, "blocks": pool.num_blocks,
                    "bytes_used": pool.used_blocks * pool.bytes_per_block}

        return await self.run_local(read)

    async def close(self) -> None:
        """Nothing to close (no tiers, no connections): SessionStore's interface."""
