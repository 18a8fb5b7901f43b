"""Chat sessions by id over one Engine and a TieredCacheStore: the class a worker serves with.

A turn has one API, in two halves so that any driver can generate in between:
  open_turn(sid, messages)      bring the session's cache to the device (restored from host or the
                                shared tier, or rebuilt by re-prefilling its transcript when lost,
                                corrupt or incompatible: a recompute), pin it, plan the turn;
                                returns the ChatSession and the token ids to prefill
  close_turn(sid, messages, t)  record the generated tokens (none: the turn failed and is rolled
                                back), unpin, persist the transcript to the store's durable tier
The worker drives it with its BatchScheduler; lessserve.testing.sessions drives it in tests.

Two threads, each with its own state. The public methods are coroutines on the caller's event loop:
they await the shared tier (Redis, the cluster-state actor; with a deadline) and nothing else. The
engine, the slot slab, the device and host tiers and the map of sessions belong to the slab's
thread (the worker's scheduler thread); the `_local_*` methods run there, reached through
`run_local` (BatchScheduler.run_exclusive in a worker: between forward passes). A turn of a session
held on this worker is one hop to the slab's thread to open and one to close; a session that only
the shared tier holds costs one more (its copy and transcript are fetched on the event loop in
between). Per-session ordering of turns is the worker's business (its SessionLocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TypeVar

from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.errors import (
    CacheMissError,
    IncompatibleCacheError,
    RestoreError,
    TierUnavailableError,
)
from lessserve.cache_store.kv import KV
from lessserve.cache_store.store import RunLocal, TieredCacheStore, run_inline
from lessserve.errors.tree import LessServeError
from lessserve.workers.chat_session import ChatSession, Transcript, TurnPlan, encode, plan_turn, render
from lessserve.workers.device_tier import EngineDeviceTier
from lessserve.workers.engine import Engine
from lessserve.workers.errors import ContextOverflowError, SessionNotFoundError
from lessserve.workers.session_ids import is_durable, private_session

T = TypeVar("T")


async def settle(aw: Awaitable[T]) -> T:
    """Await `aw` to its end even when the caller is cancelled meanwhile (the cancellation is
    raised again afterwards): what a turn took, it gives back, whatever ended it."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


@contextlib.asynccontextmanager
async def turn_scope(opening: Awaitable[tuple], close: Callable[[list[int]], Awaitable[object]]
                     ) -> AsyncIterator[tuple]:
    """A turn's open ... close as one resource: yields (*what `opening` returned, tokens); the caller
    appends every generated token to `tokens`, and `close(tokens)` runs with exactly those on every
    exit path, cancellation included (a cancelled open is closed once it finishes)."""
    tokens: list[int] = []
    task = asyncio.ensure_future(opening)
    try:
        opened = await settle(task)
    except asyncio.CancelledError:  # cancelled while opening: the open finished, so close it
        if not task.cancelled() and task.exception() is None:
            await settle(close(tokens))
        raise
    try:
        yield (*opened, tokens)
    finally:
        await settle(close(tokens))


def meta_transcript(meta: dict) -> Transcript:
    """The transcript an encoded cache carries in its header meta (IncompatibleCacheError if none)."""
    try:
        return Transcript.from_dict(meta["transcript"])
    except (KeyError, TypeError, ValueError) as e:
        raise IncompatibleCacheError(f"the cache carries no usable transcript: {e!r}") from e


@dataclass(frozen=True)
class Need:
    """What the slab's thread needs from the shared tier before it can open a session."""

    cache: bool  # the session's cache (this worker holds none)
    transcript: bool  # its durable transcript (to rebuild it)
    error: RestoreError | None = None  # why no cache is usable (when the cache is not asked for)


@dataclass
class Fetched:
    """The shared tier's answers to a Need (None: not asked)."""

    blob: object | None = None
    error: RestoreError | None = None  # why there is no usable blob (a blob that failed to load included)
    transcript: Transcript | None = None



class SessionStore:
    def __init__(self, engine: Engine, config: StoreConfig | None = None, kv: KV | None = None,
                 run_local: RunLocal = run_inline):
        """`kv`: the shared state every worker reaches (the cluster passes cluster.shared_state.shared_kv:
        Redis, or its state actor), owned by the caller's event loop; without it, Redis when
        config.redis_url is set, else no shared tier. `run_local(fn)`: runs fn on the thread that
        owns the engine (inline by default)."""
        self.engine = engine
        self.run_local = run_local
        self.config = config = config or StoreConfig()
        # --- the slab thread's state
        self.sessions: dict[str, ChatSession] = {}  # sessions this worker knows (device-resident or not)
        self.device = EngineDeviceTier(engine, quantize=config.quantize, meta_fn=self._meta)
        self.store = TieredCacheStore(config, self.device, kv=kv, run_local=run_local)
        self.prefix_builds = 0  # shared system prompts prefilled on this worker
        self.prefix_hits = 0  # new sessions started from a copy of one
        # --- the event loop's state
        self.transcript_write_failures = 0
        self.transcript_read_failures = 0
        self.unsaved: set[str] = set()  # sessions whose latest transcript is not durable yet

    def _meta(self, sid: str) -> dict:
        return {"transcript": self.sessions[sid].transcript.to_dict()}

    # --- the turn ---------------------------------------------------------------------------
    def turn(self, session_id: str, messages: list[dict], max_new_tokens: int = 0, owner: str | None = None,
             prompt_ids: list[int] | None = None) -> AbstractAsyncContextManager[tuple[ChatSession, list[int],
                                                                                     list[int]]]:
        """open_turn ... close_turn as one resource (`turn_scope`): yields (session, ids to prefill,
        tokens)."""
        return turn_scope(self.open_turn(session_id, messages, max_new_tokens, owner, prompt_ids),
                          lambda tokens: self.close_turn(session_id, messages, tokens))

    async def open_turn(self, session_id: str, messages: list[dict], max_new_tokens: int = 0,
                        owner: str | None = None, prompt_ids: list[int] | None = None) -> tuple[ChatSession, list[int]]:
        """First half of a turn driven by an external scheduler: bring the session to the device
        (pinned), check the owner and that the turn fits, and return it with the token ids to
        prefill. Pair with `close_turn`, which must be called whatever happens (also after an
        error here: it is then a no-op). A session another owner created is SessionNotFoundError.
        `prompt_ids`: a completion's prompt (no chat template), in a new session of its own."""
        if prompt_ids is not None:
            return await self.store.local_call(lambda: self._local_open_raw(session_id, prompt_ids, max_new_tokens))
        self._check_prompt(messages)  # before anything is prefilled, a shared system prompt included
        local = self.store.local_call
        out = await local(lambda: self._local_open(session_id, messages, max_new_tokens, owner, None))
        if isinstance(out, Need):  # only the shared tier can tell: fetch on this loop, off the slab's thread
            fetched = await self._fetch(session_id, out)
            out = await local(lambda: self._local_open(session_id, messages, max_new_tokens, owner, fetched))
            if isinstance(out, Need):  # cannot happen: a fetch brings the transcript that rebuilds anything
                raise TierUnavailableError(f"session {session_id!r}: the shared tier did not give what it needs")
            if fetched.blob is not None:  # loaded (kept or not, by policy) or corrupt (deleted)
                await self.store.after_shared_load(session_id, fetched.error)
        return out

    def _local_open(self, sid: str, messages: list[dict], max_new_tokens: int, owner: str | None,
                    fetched: Fetched | None) -> tuple[ChatSession, list[int]] | Need:
        self.store.pin(sid)
        try:
            chat = self._bring_to_device(sid, messages, fetched)
            if isinstance(chat, Need):
                self.store.unpin(sid)
                return chat
            if owner is not None and chat.transcript.owner not in (None, owner):
                raise SessionNotFoundError(f"session {sid!r} not found")
            plan = plan_turn(self.engine.tokenizer, chat.transcript, messages)
            self._check_fits(chat, plan, max_new_tokens)
            chat.before = Transcript.from_dict(copy.deepcopy(chat.transcript.to_dict()))
            chat.transcript.owner = chat.transcript.owner or owner
            return chat, chat.begin_turn(messages, plan)
        except BaseException:
            self.store.unpin(sid)
            self._abandon_pending(sid)
            raise

    def _local_open_raw(self, sid: str, ids: list[int], max_new_tokens: int) -> tuple[ChatSession, list[int]]:
        if not ids:
            raise ContextOverflowError("the prompt is empty")
        plan = TurnPlan(True, list(ids), "")
        self.store.pin(sid)
        try:
            self.store.free_device_slots(1)
            chat = self.sessions[sid] = ChatSession(self.engine, slot=self.device.new_slot(sid))
            self.store.admit(sid)
            self._check_fits(chat, plan, max_new_tokens)
            chat.before = Transcript()
            return chat, chat.begin_turn([], plan)
        except BaseException:
            self.store.unpin(sid)
            raise

    async def borrow_slots(self, k: int) -> list[int]:
        """k empty device slots outside any session (n > 1: the forked choices), idle sessions moved
        off the device to make room; CapacityError when every slot is pinned. Give them back with
        `return_slots`."""
        def take() -> list[int]:
            self.store.free_device_slots(k)
            return [self.engine.alloc() for _ in range(k)]

        return await self.store.local_call(take) if k else []

    async def return_slots(self, slots: list[int]) -> None:
        def give() -> None:
            for s in slots:
                self.engine.free(s)

        if slots:
            await self.store.local_call(give)

    def _abandon_pending(self, sid: str) -> None:
        """A rebuilt session whose turn does not run: its slot never consumed the pending ids, so
        no copy of it may be kept (the next turn rebuilds again)."""
        chat = self.sessions.get(sid)
        if chat is not None and chat.pending:
            chat.pending, chat.marks = [], {}
            self.store.drop_local_copies(sid)

    async def _fetch(self, sid: str, need: Need) -> Fetched:
        """The shared tier's copy and transcript of `sid`, fetched concurrently; failures become
        answers (a missing or unreachable copy is rebuilt from the transcript or the request)."""
        out = Fetched(error=need.error)

        async def cache():
            try:
                out.blob = await self.store.fetch(sid)
            except RestoreError as e:
                out.error = e

        async def transcript():
            out.transcript = await self._fetch_transcript(sid)

        await asyncio.gather(*([cache()] if need.cache else []), *([transcript()] if need.transcript else []))
        return out

    def _check_prompt(self, messages: list[dict]) -> None:
        """The whole rendered prompt fits the model's limit: ContextOverflowError (a 400 naming the
        limit) before any prefill. Runs on the caller's loop, not the slab's thread; the prompt is
        tokenized only when its UTF-8 bytes exceed the limit (a byte-level token is at least a byte)."""
        tok, limit = self.engine.tokenizer, self.engine.max_model_len
        text = render(tok, messages)
        if len(text.encode()) <= limit:
            return
        n = len(encode(tok, text))
        if n > limit:
            raise ContextOverflowError(f"the prompt is {n} tokens; this model's limit is max_model_len={limit}")

    def _check_fits(self, chat: ChatSession, plan, max_new_tokens: int) -> None:
        eng = self.engine
        held = 0 if plan.rebuild else len(chat.transcript.ids)  # consumed, or pending from a rebuild
        if held + len(plan.new_ids) + max_new_tokens > eng.max_model_len:
            raise ContextOverflowError(f"the conversation would reach {held + len(plan.new_ids) + max_new_tokens} "
                                       f"tokens (history, new messages and max_tokens); this model's limit is "
                                       f"max_model_len={eng.max_model_len}")
        if eng.spec.mode == "full":
            if held + len(plan.new_ids) + max_new_tokens > eng.spec.budget:
                raise ContextOverflowError(f"the conversation would reach {held + len(plan.new_ids) + max_new_tokens}"
                                           f" tokens; the full policy holds at most {eng.spec.budget}")

    async def close_turn(self, session_id: str, messages: list[dict], tokens: list[int]) -> None:
        """Second half: record the generated tokens, unpin, persist the transcript. A turn that
        produced nothing (it failed) is rolled back: the transcript returns to its state before
        the turn and the device copy is dropped, so the next turn rebuilds from the transcript."""
        saved = await self.store.local_call(lambda: self._local_close(session_id, messages, tokens))
        if saved is not None:
            await self._write_transcript(session_id, saved)

    def _local_close(self, sid: str, messages: list[dict], tokens: list[int]) -> dict | None:
        """-> the transcript to make durable (None: nothing to write)."""
        chat = self.sessions.get(sid)
        if chat is None or chat.before is None:  # open_turn failed: nothing was pinned or planned
            return None
        before, chat.before, chat.marks = chat.before, None, {}
        self.store.unpin(sid)
        if tokens:
            chat.finish_turn(messages, tokens)
            self.store.touch(sid)
            return chat.transcript.to_dict()
        chat.transcript = before  # the slot holds tokens the turn prefilled: drop this worker's copy
        self.store.drop_local_copies(sid)
        return None

    async def info(self, session_id: str, owner: str | None = None) -> dict | None:
        """{"tier", "tokens_seen", "cached_tokens", "cache_bytes", "turns"}; None for a session
        unknown to this owner. TierUnavailableError when only the (unreachable) shared tier knows."""
        tier, tr, counts = await self.run_local(lambda: self._local_info(session_id))
        if tier is None:
            try:
                tier = await self.store.where(session_id)
            except CacheMissError:
                tier = None
        if tr is None:
            tr = await self._fetch_transcript(session_id, strict=True)
        if (tier is None and not tr.ids) or (owner is not None and tr.owner not in (None, owner)):
            return None
        seen, cached = counts or (len(tr.ids), min(len(tr.ids), self.engine.spec.budget))
        return {"tier": tier or "transcript", "tokens_seen": seen, "cached_tokens": cached,
                "cache_bytes": self.engine.slab.slot_bytes(), "turns": tr.turns}

    def _local_info(self, sid: str) -> tuple[str | None, Transcript | None, tuple[int, int] | None]:
        """(local tier, the transcript this worker holds, (seen, cached) of its device slot)."""
        known, tier = self.sessions.get(sid), self.store.local_tier(sid)
        counts = None
        if tier == "device":
            slot = self.device.slot_of(sid)
            counts = (int(self.engine.slab.seen[slot]), int(self.engine.slab.cached_tokens(slot)))
        return tier, (copy.deepcopy(known.transcript) if known else None), counts

    def _bring_to_device(self, sid: str, messages: list[dict] | None, fetched: Fetched | None) -> ChatSession | Need:
        st = self.store
        try:
            if fetched is None:
                restored = st.restore_local(sid)
                if restored is None:  # only the shared tier may hold it
                    return Need(cache=True, transcript=True)  # the transcript too: a failed copy rebuilds
            elif fetched.blob is None:
                raise fetched.error or RestoreError(sid, st.shared_name or "host", CacheMissError(sid))
            else:
                try:
                    restored = st.load(sid, fetched.blob, st.shared_name)
                except RestoreError as e:
                    fetched.error = e  # read back on the event loop: a corrupt copy is deleted there
                    raise
        except RestoreError as e:
            return self._rebuild(sid, e, messages, fetched)
        slot = self.device.slot_of(sid)
        if restored.source == "device":
            return self.sessions[sid]
        try:
            tr = meta_transcript(restored.meta)
        except IncompatibleCacheError as e:  # a cache without its transcript: rebuild over the slot
            return self._rebuild(sid, RestoreError(sid, restored.source, e), messages, fetched)
        self.sessions[sid] = chat = ChatSession(self.engine, slot=slot, transcript=tr)
        return chat

    def _rebuild(self, sid: str, err: RestoreError, messages: list[dict] | None,
                 fetched: Fetched | None) -> ChatSession | Need:
        """No usable cache: re-prefill the transcript (a recompute: its ids become the session's
        `pending`, prefilled by the turn ahead of its own), or start a new session. A transcript the
        request's history does not extend is not re-prefilled (the turn then prefills the request
        from scratch)."""
        known = self.sessions.get(sid)
        if known is None and (fetched is None or fetched.transcript is None):
            return Need(cache=False, transcript=True, error=err)
        tr = known.transcript if known else fetched.transcript
        if tr.ids and messages is not None and plan_turn(self.engine.tokenizer, tr, messages).rebuild:
            tr = Transcript(turns=tr.turns, owner=tr.owner)
        if sid not in self.device.slots:  # rebuilding over a restored but unusable copy reuses its slot
            self.store.free_device_slots(1)
        if not tr.ids and not known and messages and self._from_prefix(sid, messages, tr.owner):
            return self.sessions[sid]  # a new conversation starting from a shared system prompt
        slot = self.device.new_slot(sid)
        self.store.admit(sid)
        if known or tr.ids:
            self.store.record_recompute(err.tier)
        self.sessions[sid] = chat = ChatSession(self.engine, slot=slot, transcript=tr)
        chat.pending = list(tr.ids)  # re-prefilled by the turn's own request, chunk by chunk
        return chat

    # --- forks and shared prefixes ---------------------------------------------------------------
    async def fork(self, src: str, dst: str, owner: str | None = None) -> bool:
        """`dst` starts as a copy of `src`'s compressed cache and transcript: one slot copied on the
        device, O(budget) whatever the conversation's length; later turns of either never reach the
        other. False (dst then starts empty and its first turn prefills its history) when src has
        no usable cache or belongs to another owner."""
        local = self.store.local_call
        out = await local(lambda: self._local_fork(src, dst, owner, None))
        if isinstance(out, Need):  # src is not on this worker: only a copy in the shared tier will do
            if self.store.shared is None or not out.cache:
                return False
            fetched = await self._fetch(src, out)
            if fetched.error is not None:
                return False
            out = await local(lambda: self._local_fork(src, dst, owner, fetched))
            await self.store.after_shared_load(src, fetched.error)
        return out is True

    def _local_fork(self, src: str, dst: str, owner: str | None, fetched: Fetched | None) -> bool | Need:
        if dst in self.sessions or self.store.holds(dst):
            return False
        self.store.pin(src)
        try:
            try:
                chat = self._bring_to_device(src, None, fetched)
            except LessServeError:
                return False
            if isinstance(chat, Need):
                return chat
            if chat.pending:  # only a rebuild would give a copy: dst prefills its own history instead
                self._abandon_pending(src)
                return False
            if owner is not None and chat.transcript.owner not in (None, owner):
                return False
            self._copy_into(dst, chat)
            return True
        finally:
            self.store.unpin(src)
            self.store.touch(src)

    def _copy_into(self, dst: str, chat: ChatSession) -> ChatSession:
        self.store.free_device_slots(1)  # the source is pinned by the caller
        slot = self.device.new_slot(dst)
        self.engine.slab.copy(chat.slot, slot)
        self.store.admit(dst)
        tr = Transcript.from_dict(copy.deepcopy(chat.transcript.to_dict()))
        self.sessions[dst] = out = ChatSession(self.engine, slot=slot, transcript=tr)
        return out

    def _from_prefix(self, sid: str, messages: list[dict], owner: str | None) -> bool:
        """A new session whose history opens with a system prompt starts from a copy of that
        prompt's compressed state, prefilled once per worker (a private session, workers/session_ids.py).
        The caller holds sid pinned. False when the prompt is not a clean prefix of the template."""
        if messages[0].get("role") != "system" or len(messages) < 2:
            return False
        tok = self.engine.tokenizer
        text = tok.apply_chat_template(messages[:1], add_generation_prompt=False, tokenize=False)
        if not render(tok, messages).startswith(text) or len(text) < 64:
            return False
        key = private_session("prefix", hashlib.sha256(text.encode()).hexdigest()[:16])
        if key in self.device.slots:  # built on this worker and still on its device: a slot copy
            self.store.pin(key)
            try:
                chat = self._copy_into(sid, self.sessions[key])
            finally:
                self.store.unpin(key)
            chat.transcript.owner = owner
            self.prefix_hits += 1
            return True
        if self.store.holds(key):  # moved off the device: built again
            self.store.drop_local_copies(key)
        self.sessions.pop(key, None)
        # Built from this session's own turn: its slot starts empty with the prompt pending (prefilled
        # by the turn's request, chunk by chunk between other sessions' steps), and a mark copies the
        # slot the moment it holds exactly the prompt.
        ids = encode(tok, text)
        slot = self.device.new_slot(sid)  # the caller made room
        self.store.admit(sid)
        prompt = Transcript(ids=list(ids), text=text, messages=messages[:1])
        self.sessions[sid] = chat = ChatSession(self.engine, slot=slot,
                                                transcript=Transcript(ids=list(ids), text=text,
                                                                      messages=messages[:1], owner=owner))
        chat.pending = list(ids)
        chat.marks[len(ids)] = lambda: self._keep_prefix(key, chat, prompt)
        return True

    def _keep_prefix(self, key: str, chat: ChatSession, prompt: Transcript) -> None:
        """On the slab's thread, mid-prefill: `chat`'s slot holds exactly the shared prompt; keep a
        copy under `key` for the next sessions (best effort: no free slot, no copy)."""
        if key in self.device.slots:  # another session built it meanwhile
            return
        try:
            self.store.free_device_slots(1)
            slot = self.device.new_slot(key)
        except LessServeError:
            return
        self.engine.slab.copy(chat.slot, slot)
        self.store.admit(key)
        self.sessions[key] = ChatSession(self.engine, slot=slot, transcript=prompt)
        self.prefix_builds += 1

    # --- transcripts (the event loop's) ---------------------------------------------------------
    async def _fetch_transcript(self, sid: str, strict: bool = False) -> Transcript:
        """The durable transcript; an empty one for a new session, or (unless `strict`) when the
        shared tier is down: the request's own history then rebuilds the session (plan_turn)."""
        try:
            return Transcript.from_dict(await self.store.get_transcript(sid))
        except CacheMissError:
            return Transcript()  # a new session (or one nobody can remember: plan_turn rebuilds it)
        except TierUnavailableError:
            self.transcript_read_failures += 1
            if strict:
                raise
            return Transcript()

    async def _write_transcript(self, sid: str, transcript: dict) -> None:
        if not is_durable(sid):  # a worker's private helper session (a shared prefix, a one-off)
            return
        try:
            await self.store.put_transcript(sid, transcript)
            self.unsaved.discard(sid)
        except TierUnavailableError:  # durability degraded, the conversation is not: retried by flush()
            self.transcript_write_failures += 1
            self.unsaved.add(sid)

    def _local_transcripts(self, sids) -> dict[str, dict]:
        return {s: self.sessions[s].transcript.to_dict() for s in sids if s in self.sessions}

    async def flush(self) -> int:
        """Write the transcripts an outage kept from being saved; returns how many are still unsaved."""
        sids = list(self.unsaved)
        held = await self.run_local(lambda: self._local_transcripts(sids))
        for sid in sids:
            if sid in held:
                await self._write_transcript(sid, held[sid])
            else:
                self.unsaved.discard(sid)
        return len(self.unsaved)

    async def republish(self, sids: list[str] | None = None) -> int:
        """Write the transcripts of these sessions (default: all this worker knows) after the shared
        tier lost its contents, each only where the durable one is missing or records fewer turns
        (another worker may have served a later turn). Returns the number written."""
        held = await self.run_local(lambda: self._local_transcripts(list(self.sessions) if sids is None else sids))
        n = 0
        for sid, tr in held.items():
            try:
                durable = (await self.store.get_transcript(sid)).get("turns", 0)
            except CacheMissError:
                durable = -1
            except TierUnavailableError:
                self.unsaved.add(sid)
                continue
            if durable < tr["turns"]:
                await self._write_transcript(sid, tr)
                n += sid not in self.unsaved
        return n

    async def drop_local(self, sid: str) -> None:
        """Forget this worker's copy (device, host, in memory), never the shared tier's or the
        durable transcript: another worker holds a newer one."""
        if await self.run_local(lambda: self._local_drop(sid)):
            self.unsaved.discard(sid)

    def _local_drop(self, sid: str) -> bool:
        if self.store.is_pinned(sid):
            return False
        self.store.drop_local_copies(sid)
        self.sessions.pop(sid, None)
        return True

    async def resident(self) -> dict[str, tuple[str | None, int]]:
        """Durable sessions this worker knows (client and response sessions) -> (owner, turns)."""
        return await self.run_local(lambda: {sid: (c.transcript.owner, c.transcript.turns)
                                             for sid, c in self.sessions.items() if is_durable(sid)})

    # --- placement --------------------------------------------------------------------------
    async def where(self, session_id: str) -> str:
        """"device", "host" or the shared tier's name; CacheMissError if no tier holds the cache."""
        return await self.store.where(session_id)

    async def offload(self, session_id: str, tier: str) -> str:
        """Move the session's cache down to "host" or "shared" (or the shared tier's name, e.g.
        "redis"); returns the tier it landed in."""
        return await self.store.offload(session_id, tier)

    async def restore(self, session_id: str) -> str:
        """Bring the session's cache to the device ahead of its next turn; returns where it came
        from. Raises RestoreError when it cannot (the next turn then rebuilds it)."""
        return (await self.store.restore(session_id)).source

    async def delete(self, session_id: str, owner: str | None = None) -> bool:
        """Forget the session: its cache in every tier and its transcript. True if it existed;
        another owner's session is left alone (False)."""
        existed = await self.info(session_id, owner) is not None
        if not existed and owner is not None and await self.run_local(lambda: session_id in self.sessions):
            return False  # someone else's
        try:  # the local copies go first; a shared tier that is down raises after them
            await self.store.delete(session_id)
        finally:  # whatever the shared tier did, this worker forgets the session
            self.unsaved.discard(session_id)
            await self.run_local(lambda: self.sessions.pop(session_id, None))
        return existed

    async def drain(self) -> int:
        """Move every idle session to the shared tier (host memory without one)."""
        held = await self.run_local(lambda: self._local_transcripts(list(self.device.slots)))
        for sid, tr in held.items():
            await self._write_transcript(sid, tr)
        moved = await self.store.drain()
        await self._forget_departed()
        return moved

    async def maintain(self) -> int:
        """Idle-time movement (device -> host -> shared tier); call it periodically."""
        moved = await self.store.maintain()
        await self._forget_departed()
        return moved

    async def _forget_departed(self) -> None:
        """Stop keeping sessions whose cache left this worker for the shared tier once their
        transcript is durable there: memory per worker stays bounded by its tiers, not by every
        session it ever served. (Without a shared tier nothing departs: the transcript is all.)"""
        if self.store.shared is None:
            return
        unsaved = frozenset(self.unsaved)

        def forget():
            for sid in list(self.sessions):
                if not self.store.holds(sid) and sid not in unsaved and not self.store.is_pinned(sid):
                    del self.sessions[sid]

        await self.run_local(forget)

    # --- inspection -------------------------------------------------------------------------
    async def transcript(self, session_id: str) -> Transcript:
        """The session's transcript: this worker's, else the durable one; CacheMissError if none."""
        known = await self.run_local(lambda: self.sessions.get(session_id))
        if known is not None:
            return known.transcript
        tr = await self._fetch_transcript(session_id, strict=True)
        if not tr.ids:
            raise CacheMissError(f"unknown session {session_id!r}")
        return tr

    async def stats(self) -> dict:
        out = await self.store.stats()
        out["total"].update(transcript_write_failures=self.transcript_write_failures,
                            transcript_read_failures=self.transcript_read_failures,
                            unsaved_transcripts=len(self.unsaved), prefix_builds=self.prefix_builds,
                            prefix_hits=self.prefix_hits)
        return out

    async def close(self) -> None:
        """Close the store's connections (caches on the device are kept)."""
        try:
            await self.store.close()
        except LessServeError:
            pass
