"""Chat sessions by id over one Engine and a TieredCacheStore: the class a worker serves with.

A turn has one API, in two halves so that any driver can generate in between:
  open_turn(sid, messages)      bring the session's cache to the device (restored from host or the
                                shared tier, or rebuilt by re-prefilling its transcript when lost,
                                corrupt or incompatible: a recompute), pin it, plan the turn;
                                returns the ChatSession and the token ids to prefill
  close_turn(sid, messages, t)  record the generated tokens (none: the turn failed and is rolled
                                back), unpin, persist the transcript to the store's durable tier
The worker drives it with its BatchScheduler; lessserve.testing.run_turn drives it with
Engine.generate for tests and benchmarks.

Threads: a SessionStore is not thread-safe. One thread owns it and the engine together (the
worker's scheduler thread: every call arrives through BatchScheduler.run_exclusive, between
forward passes). The store's asyncio I/O (redis-py objects) belongs to a private event loop on a
daemon thread (`io`); each call here blocks until its coroutine is done, so store operations never
interleave. Per-session ordering of turns is the worker's business (its SessionLocks).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib

from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.errors import (
    CacheMissError,
    CacheStoreError,
    IncompatibleCacheError,
    RestoreError,
    TierUnavailableError,
)
from lessserve.cache_store.store import TieredCacheStore
from lessserve.cache_store.tier import Tier
from lessserve.errors.tree import LessServeError
from lessserve.workers.chat_session import ChatSession, Transcript, encode, plan_turn
from lessserve.workers.device_tier import EngineDeviceTier
from lessserve.workers.engine import Engine
from lessserve.workers.errors import ContextOverflowError, SessionNotFoundError
from lessserve.workers.io_loop import IoLoop

LOCAL = "~"  # session ids a client cannot send (outside SESSION_ID_PATTERN): a worker's own sessions


def meta_transcript(meta: dict) -> Transcript:
    """The transcript an encoded cache carries in its header meta (IncompatibleCacheError if none)."""
    try:
        return Transcript.from_dict(meta["transcript"])
    except (KeyError, TypeError, ValueError) as e:
        raise IncompatibleCacheError(f"the cache carries no usable transcript: {e!r}") from e


class SessionStore:
    def __init__(self, engine: Engine, config: StoreConfig | None = None, shared: Tier | None = None):
        """`shared`: a tier every worker reaches, standing in for Redis when none is configured
        (the cluster passes one backed by its state actor); it may carry `.transcripts`."""
        self.engine = engine
        self.shared = shared
        self._open: dict[str, Transcript] = {}  # transcripts as they were before an open turn
        self.config = config = config or StoreConfig()
        self.sessions: dict[str, ChatSession] = {}  # sessions this worker knows (device-resident or not)
        self.device = EngineDeviceTier(engine, quantize=config.quantize, meta_fn=self._meta)
        self.io = IoLoop("session-store-io")
        self.store: TieredCacheStore = self.io.run(self._make_store())
        self.transcript_write_failures = 0
        self.transcript_read_failures = 0
        self.prefix_builds = 0  # shared system prompts prefilled on this worker
        self.prefix_hits = 0  # new sessions started from a copy of one
        self.unsaved: set[str] = set()  # sessions whose latest transcript is not durable yet

    async def _make_store(self) -> TieredCacheStore:  # redis-py asyncio objects belong to the I/O loop
        return TieredCacheStore(self.config, self.device, shared=self.shared,
                                transcripts=getattr(self.shared, "transcripts", None))

    def _meta(self, sid: str) -> dict:
        return {"transcript": self.sessions[sid].transcript.to_dict()}

    # --- the turn ---------------------------------------------------------------------------
    def open_turn(self, session_id: str, messages: list[dict], max_new_tokens: int = 0,
                  owner: str | None = None) -> tuple[ChatSession, list[int]]:
        """First half of a turn driven by an external scheduler: bring the session to the device
        (pinned), check the owner and that the turn fits, and return it with the token ids to
        prefill. Pair with `close_turn`, which must be called whatever happens (also after an
        error here: it is then a no-op). A session another owner created is SessionNotFoundError."""
        chat = self._bring_to_device(session_id, messages)
        try:
            if owner is not None and chat.transcript.owner not in (None, owner):
                raise SessionNotFoundError(f"session {session_id!r} not found")
            plan = plan_turn(self.engine.tokenizer, chat.transcript, messages)
            self._check_fits(chat, plan, max_new_tokens)
            self._open[session_id] = Transcript.from_dict(copy.deepcopy(chat.transcript.to_dict()))
            chat.transcript.owner = chat.transcript.owner or owner
            return chat, chat.begin_turn(messages, plan)
        except BaseException:
            self.store.unpin(session_id)
            raise

    def _check_fits(self, chat: ChatSession, plan, max_new_tokens: int) -> None:
        eng = self.engine
        held = 0 if plan.rebuild else eng.slab.seen[chat.slot]
        if held + len(plan.new_ids) + max_new_tokens > eng.max_model_len:
            raise ContextOverflowError(f"the conversation would reach {held + len(plan.new_ids) + max_new_tokens} "
                                       f"tokens (history, new messages and max_tokens); this model's limit is "
                                       f"max_model_len={eng.max_model_len}")
        if eng.spec.mode == "full":
            if held + len(plan.new_ids) + max_new_tokens > eng.spec.budget:
                raise ContextOverflowError(f"the conversation would reach {held + len(plan.new_ids) + max_new_tokens}"
                                           f" tokens; the full policy holds at most {eng.spec.budget}")

    def close_turn(self, session_id: str, messages: list[dict], tokens: list[int]) -> None:
        """Second half: record the generated tokens, unpin, persist the transcript. A turn that
        produced nothing (it failed) is rolled back: the transcript returns to its state before
        the turn and the device copy is dropped, so the next turn rebuilds from the transcript."""
        chat = self.sessions.get(session_id)
        before = self._open.pop(session_id, None)
        if chat is None or before is None:  # open_turn failed: nothing was pinned or planned
            return
        self.store.unpin(session_id)
        if tokens:
            chat.finish_turn(messages, tokens)
            self.store.touch(session_id)
            self._write_transcript(session_id)
        else:  # the slot holds tokens the turn prefilled: drop this worker's copy, keep the transcript
            chat.transcript = before
            self.io.run(self.store.drop_local(session_id))

    def info(self, session_id: str, owner: str | None = None) -> dict | None:
        """{"tier", "tokens_seen", "cached_tokens", "cache_bytes", "turns"}; None for a session
        unknown to this owner. TierUnavailableError when only the (unreachable) shared tier knows."""
        try:
            tier = self.io.run(self.store.where(session_id))
        except CacheMissError:
            tier = None
        known = self.sessions.get(session_id)
        tr = known.transcript if known else self._fetch_transcript(session_id, strict=True)
        if (tier is None and not tr.ids) or (owner is not None and tr.owner not in (None, owner)):
            return None
        eng = self.engine
        if tier == "device":
            slot = self.device.slot_of(session_id)
            seen, cached = eng.slab.seen[slot], eng.slab.cached_tokens(slot)
        else:
            seen, cached = len(tr.ids), min(len(tr.ids), eng.spec.budget)
        return {"tier": tier or "transcript", "tokens_seen": seen, "cached_tokens": cached,
                "cache_bytes": eng.slab.slot_bytes(), "turns": tr.turns}

    def _bring_to_device(self, sid: str, messages: list[dict] | None = None) -> ChatSession:
        self.store.pin(sid)
        try:
            restored = self.io.run(self.store.restore(sid))
        except RestoreError as e:
            return self._rebuild(sid, e, messages)
        except BaseException:
            self.store.unpin(sid)
            raise
        slot = self.device.slot_of(sid)
        if restored.source == "device":
            return self.sessions[sid]
        try:
            tr = meta_transcript(restored.meta)
        except IncompatibleCacheError as e:  # a cache without its transcript: rebuild over the slot
            return self._rebuild(sid, RestoreError(sid, restored.source, e), messages)
        self.sessions[sid] = chat = ChatSession(self.engine, slot=slot, transcript=tr)
        return chat

    def _rebuild(self, sid: str, err: RestoreError, messages: list[dict] | None = None) -> ChatSession:
        """No usable cache: re-prefill the transcript (a recompute), or start a new session. A
        transcript the request's history does not extend is not re-prefilled (the turn then
        prefills the request from scratch). `ChatSession.rebuilt` counts the tokens re-prefilled."""
        try:
            known = self.sessions.get(sid)
            tr = known.transcript if known else self._fetch_transcript(sid)
            if tr.ids and messages is not None and plan_turn(self.engine.tokenizer, tr, messages).rebuild:
                tr = Transcript(turns=tr.turns, owner=tr.owner)
            if sid not in self.device.slots:  # rebuilding over a restored but unusable copy reuses its slot
                self.io.run(self.store.make_room())
            if not tr.ids and not known and messages and self._from_prefix(sid, messages, tr.owner):
                return self.sessions[sid]  # a new conversation starting from a shared system prompt
            slot = self.device.new_slot(sid)
            self.store.admit(sid)
            if tr.ids:
                self.engine.prefill(slot, tr.ids)
            if known or tr.ids:
                self.store.record_recompute(err.tier)
            self.sessions[sid] = chat = ChatSession(self.engine, slot=slot, transcript=tr)
            chat.rebuilt = len(tr.ids)
            return chat
        except BaseException:
            self.store.unpin(sid)
            raise

    # --- forks and shared prefixes ---------------------------------------------------------------
    def fork(self, src: str, dst: str, owner: str | None = None) -> bool:
        """`dst` starts as a copy of `src`'s compressed cache and transcript: one slot copied on the
        device, O(budget) whatever the conversation's length; later turns of either never reach the
        other. False (dst then starts empty and its first turn prefills its history) when src has
        no usable cache or belongs to another owner."""
        if dst in self.sessions or self.store.holds(dst):
            return False
        if src not in self.sessions:
            try:
                self.io.run(self.store.where(src))  # a cache another worker left in the shared tier
            except (CacheMissError, TierUnavailableError):
                return False
        try:
            chat = self._bring_to_device(src)
        except LessServeError:
            return False
        try:
            if owner is not None and chat.transcript.owner not in (None, owner):
                return False
            self._copy_into(dst, chat)
            return True
        finally:
            self.store.unpin(src)
            self.store.touch(src)

    def _copy_into(self, dst: str, chat: ChatSession) -> ChatSession:
        self.io.run(self.store.make_room())  # the source is pinned by the caller
        slot = self.device.new_slot(dst)
        self.engine.slab.copy(chat.slot, slot)
        self.store.admit(dst)
        tr = Transcript.from_dict(copy.deepcopy(chat.transcript.to_dict()))
        self.sessions[dst] = out = ChatSession(self.engine, slot=slot, transcript=tr)
        return out

    def _from_prefix(self, sid: str, messages: list[dict], owner: str | None) -> bool:
        """A new session whose history opens with a system prompt starts from a copy of that
        prompt's compressed state, prefilled once per worker (a local session "~prefix-<hash>").
        The caller holds sid pinned. False when the prompt is not a clean prefix of the template."""
        if messages[0].get("role") != "system" or len(messages) < 2:
            return False
        tok = self.engine.tokenizer
        text = tok.apply_chat_template(messages[:1], add_generation_prompt=False, tokenize=False)
        from lessserve.workers.chat_session import render

        if not render(tok, messages).startswith(text) or len(text) < 64:
            return False
        key = LOCAL + "prefix-" + hashlib.sha256(text.encode()).hexdigest()[:16]
        stale = key not in self.device.slots  # never built here, or moved off the device: build it again
        if stale and self.store.holds(key):
            self.io.run(self.store.drop_local(key))
        self.store.pin(key)
        try:
            if stale:
                self.sessions.pop(key, None)
                self.io.run(self.store.make_room())
                slot = self.device.new_slot(key)
                self.store.admit(key)
                ids = encode(tok, text)
                self.engine.prefill(slot, ids)
                self.sessions[key] = ChatSession(self.engine, slot=slot,
                                                 transcript=Transcript(ids=ids, text=text, messages=messages[:1]))
                self.prefix_builds += 1
            chat = self._copy_into(sid, self.sessions[key])
            chat.transcript.owner = owner
            self.prefix_hits += 1
            return True
        finally:
            self.store.unpin(key)

    def _fetch_transcript(self, sid: str, strict: bool = False) -> Transcript:
        """The durable transcript; an empty one for a new session, or (unless `strict`) when the
        shared tier is down: the request's own history then rebuilds the session (plan_turn)."""
        try:
            return Transcript.from_dict(self.io.run(self.store.get_transcript(sid)))
        except CacheMissError:
            return Transcript()  # a new session (or one nobody can remember: plan_turn rebuilds it)
        except TierUnavailableError:
            self.transcript_read_failures += 1
            if strict:
                raise
            return Transcript()

    def _write_transcript(self, sid: str) -> None:
        if sid.startswith(LOCAL):  # a worker's own helper session (a shared prefix): never durable
            return
        try:
            self.io.run(self.store.put_transcript(sid, self.sessions[sid].transcript.to_dict()))
            self.unsaved.discard(sid)
        except TierUnavailableError:  # durability degraded, the conversation is not: retried by flush()
            self.transcript_write_failures += 1
            self.unsaved.add(sid)

    def flush(self) -> int:
        """Write the transcripts an outage kept from being saved; returns how many are still unsaved."""
        for sid in list(self.unsaved):
            if sid in self.sessions:
                self._write_transcript(sid)
            else:
                self.unsaved.discard(sid)
        return len(self.unsaved)

    def republish(self, sids: list[str] | None = None) -> int:
        """Write the transcripts of these sessions (default: all this worker knows) after the shared
        tier lost its contents, each only where the durable one is missing or records fewer turns
        (another worker may have served a later turn). Returns the number written."""
        n = 0
        for sid in list(self.sessions) if sids is None else [x for x in sids if x in self.sessions]:
            try:
                durable = self.io.run(self.store.get_transcript(sid)).get("turns", 0)
            except CacheMissError:
                durable = -1
            except TierUnavailableError:
                self.unsaved.add(sid)
                continue
            if durable < self.sessions[sid].transcript.turns:
                self._write_transcript(sid)
                n += sid not in self.unsaved
        return n

    def drop_local(self, sid: str) -> None:
        """Forget this worker's copy (device, host, in memory), never the shared tier's or the
        durable transcript: another worker holds a newer one."""
        if self.store.is_pinned(sid):
            return
        self.io.run(self.store.drop_local(sid))
        self.sessions.pop(sid, None)
        self.unsaved.discard(sid)

    def resident(self) -> dict[str, tuple[str | None, int]]:
        """Sessions this worker knows -> (owner, turns)."""
        return {sid: (chat.transcript.owner, chat.transcript.turns) for sid, chat in self.sessions.items()
                if not sid.startswith(LOCAL)}

    # --- placement --------------------------------------------------------------------------
    def where(self, session_id: str) -> str:
        """"device", "host" or the shared tier's name; CacheMissError if no tier holds the cache."""
        return self.io.run(self.store.where(session_id))

    def offload(self, session_id: str, tier: str) -> str:
        """Move the session's cache down to "host" or "shared" (or the shared tier's name, e.g.
        "redis"); returns the tier it landed in."""
        return self.io.run(self.store.offload(session_id, tier))

    def restore(self, session_id: str) -> str:
        """Bring the session's cache to the device ahead of its next turn; returns where it came
        from. Raises RestoreError when it cannot (the next turn then rebuilds it)."""
        return self.io.run(self.store.restore(session_id)).source

    def delete(self, session_id: str, owner: str | None = None) -> bool:
        """Forget the session: its cache in every tier and its transcript. True if it existed;
        another owner's session is left alone (False)."""
        existed = self.info(session_id, owner) is not None
        if not existed and owner is not None and session_id in self.sessions:
            return False  # someone else's
        self.io.run(self.store.delete(session_id))
        self.unsaved.discard(session_id)
        self.sessions.pop(session_id, None)
        return existed

    def drain(self) -> int:
        """Move every idle session to the shared tier (host memory without Redis)."""
        for sid in list(self.device.slots):
            self._write_transcript(sid)
        moved = self.io.run(self.store.drain())
        self._forget_departed()
        return moved

    def maintain(self) -> int:
        """Idle-time movement (device -> host -> shared tier); call it periodically."""
        moved = self.io.run(self.store.maintain())
        self._forget_departed()
        return moved

    def _forget_departed(self) -> None:
        """Stop keeping sessions whose cache left this worker for the shared tier once their
        transcript is durable there: memory per worker stays bounded by its tiers, not by every
        session it ever served. (Without a shared tier nothing departs: the transcript is all.)"""
        if self.store.shared is None:
            return
        for sid in list(self.sessions):
            if not self.store.holds(sid) and sid not in self.unsaved and not self.store.is_pinned(sid):
                del self.sessions[sid]

    # --- inspection -------------------------------------------------------------------------
    def transcript(self, session_id: str) -> Transcript:
        """The session's transcript: this worker's, else the durable one; CacheMissError if none."""
        if session_id in self.sessions:
            return self.sessions[session_id].transcript
        tr = self._fetch_transcript(session_id, strict=True)
        if not tr.ids:
            raise CacheMissError(f"unknown session {session_id!r}")
        return tr

    def stats(self) -> dict:
        out = self.io.run(self.store.stats())
        out["total"].update(transcript_write_failures=self.transcript_write_failures,
                            transcript_read_failures=self.transcript_read_failures,
                            unsaved_transcripts=len(self.unsaved), prefix_builds=self.prefix_builds,
                            prefix_hits=self.prefix_hits)
        return out

    def close(self) -> None:
        """Close the store's connections and stop its I/O thread (caches on the device are kept)."""
        with contextlib.suppress(CacheStoreError):
            self.io.run(self.store.close())
        self.io.stop()
