"""The worker deployment: one replica = one model + slot slab + tiered cache store +
continuous-batching scheduler. Each turn streams events back to the router:
  {"type": "start", "prompt_tokens", "prefilled"}, {"type": "token", "text"}, ...,
  {"type": "end", "finish_reason", "completion_tokens"}  or an error event (cluster/http_errors.py).

Concurrency: the actor's event loop runs the turns; per session they run in arrival order
(SessionLocks), at most `max_slots` at once (TurnGate, the rest wait or get 503); every engine and
SessionStore call runs on the scheduler thread between forward passes (run_exclusive).

Degraded mode: directory writes that fail are kept and replayed (WriteBehind), transcripts that
fail are retried (SessionStore.flush); a session whose cache or transcript only the unreachable
shared tier holds is rebuilt from the request's own history. When the directory's backend comes
back with another epoch (Redis restarted, emptied or from its AOF), the worker re-publishes every
session it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from ray import serve

from lessserve.cluster.admission import TurnGate
from lessserve.cluster.config import ServeConfig
from lessserve.cluster.directory import DirectoryUnavailableError, WriteBehind, make_directory
from lessserve.cluster.http_errors import http_error
from lessserve.cluster.state import get_state
from lessserve.errors.tree import LessServeError
from lessserve.workers.chat_session import Detokenizer, StopStrings
from lessserve.workers.engine import Engine
from lessserve.workers.scheduler import BatchScheduler, SamplingParams
from lessserve.workers.session_store import SessionStore
from lessserve.workers.threads import reserve_compute_threads

log = logging.getLogger("ray.serve")


class SessionLocks:
    """One FIFO lock per session, kept only while someone holds or waits for it."""

    def __init__(self):
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, sid: str):
        lock, users = self._locks.get(sid, (asyncio.Lock(), 0))
        self._locks[sid] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[sid]
            if users == 1:
                del self._locks[sid]
            else:
                self._locks[sid] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return None


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (tests, benchmarks)
        return "local-" + uuid.uuid4().hex[:8]


class LessWorker:
    def __init__(self, config: dict):
        self.cfg = ServeConfig.model_validate(config)
        threads = reserve_compute_threads()  # before the model loads: only the scheduler thread has a team
        self.engine = Engine(self.cfg.engine)
        self.sessions = SessionStore(self.engine, self.cfg.store, shared=self._shared_tier())
        self.scheduler = BatchScheduler(self.engine, threads=threads)
        self.worker_id = _replica_id()
        self.node_id = _node_id()
        self.directory = WriteBehind(make_directory(self.cfg.store.redis_url))
        self.state = get_state()
        self.locks = SessionLocks()
        self.gate = TurnGate(self.cfg.engine.max_slots, self.cfg.queue_depth, self.cfg.queue_max_wait_s)
        self.draining = False
        self.epoch: str | None = None  # the directory backend's epoch last seen (None: unreachable)
        self.republished = 0
        self._maint = asyncio.get_event_loop().create_task(self._maintain_loop())

    def _shared_tier(self):
        """Without Redis, sessions move between workers through the cluster-state actor."""
        if self.cfg.store.redis_url:
            return None
        from lessserve.cluster.actor_tier import ActorTier

        return ActorTier(get_state())

    # --- turns ------------------------------------------------------------------------------
    async def chat(self, session_id: str | None, owner: str, messages: list[dict], max_tokens: int,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   stop: list[str] | None = None, fork_from: str | None = None, ephemeral: bool = False):
        """One turn. `fork_from`: the new session starts as a copy of that one's cache (a response
        continuing another, cluster/responses.py); `ephemeral`: forget the session afterwards."""
        sid = session_id or f"oneoff-{uuid.uuid4().hex}"
        async with self.locks.hold(sid):  # turns of one session run in arrival order
            try:
                async with self.gate.admit():  # at most max_slots turns at once; the rest wait, bounded
                    if fork_from:
                        async with self.locks.hold(fork_from):  # never copy a slot mid-turn
                            await self.scheduler.run_exclusive(lambda: self.sessions.fork(fork_from, sid, owner))
                    async for ev in self._turn(sid, session_id, owner, messages, max_tokens, temperature, top_p,
                                               seed, stop):
                        yield ev
            except LessServeError as e:  # the gate's CapacityError: answered from the one table
                yield http_error(e).to_event()
            finally:
                if session_id is None or ephemeral:
                    await self.scheduler.run_exclusive(lambda: self.sessions.delete(sid))
                if ephemeral:
                    await self.directory.forget(sid)

    async def _turn(self, sid, session_id, owner, messages, max_tokens, temperature, top_p, seed, stop):
        try:
            session, new_ids = await self.scheduler.run_exclusive(
                lambda: self.sessions.open_turn(sid, messages, max_tokens, owner))
        except LessServeError as e:  # a known condition: answered from the one table (cluster/http_errors.py)
            yield http_error(e).to_event()
            return
        if session_id is not None:  # this worker serves the latest turn: it holds the current copy
            await self.directory.place(sid, self.worker_id, owner, sum(m["role"] == "user" for m in messages))
        tok = self.engine.tokenizer
        prefilled = len(new_ids) + session.rebuilt  # what this turn computed again: not cached
        session.rebuilt = 0
        yield {"type": "start", "prompt_tokens": len(session.transcript.ids), "prefilled": prefilled}
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop_ids=self.engine.stop_ids)
        tokens: list[int] = []
        detok, stops = Detokenizer(tok), StopStrings(stop or [])
        finish, hit = "length", False
        try:
            async for t in self.scheduler.generate(session.slot, new_ids, params, tokens):
                if t in self.engine.stop_ids:
                    finish = "stop"
                    break
                piece, hit = stops.push(detok.push(t))
                if piece:
                    yield {"type": "token", "text": piece}
                if hit:
                    finish = "stop"
                    break
            if not hit and (tail := stops.flush()):
                yield {"type": "token", "text": tail}
        finally:  # also when the client went away: record exactly what the cache consumed
            await self.scheduler.run_exclusive(lambda: self.sessions.close_turn(sid, messages, tokens))
        yield {"type": "end", "finish_reason": finish,
               "completion_tokens": len([t for t in tokens if t not in self.engine.stop_ids])}

    # --- sessions ---------------------------------------------------------------------------
    async def session_info(self, session_id: str, owner: str | None = None) -> dict | None:
        info = await self.scheduler.run_exclusive(lambda: self.sessions.info(session_id, owner))
        return None if info is None else {"id": session_id, "worker": self.worker_id, "node": self.node_id, **info}

    async def delete_session(self, session_id: str, owner: str | None = None) -> bool:
        async with self.locks.hold(session_id):
            existed = await self.scheduler.run_exclusive(lambda: self.sessions.delete(session_id, owner))
        if existed:
            await self.directory.forget(session_id)
        return bool(existed)

    async def drain(self) -> int:
        """Finish in-flight turns (up to drain_timeout_s), offload every session to the shared tier
        and leave the directory (scale-down, SIGTERM, node drain)."""
        self.draining = True
        end = time.monotonic() + self.cfg.drain_timeout_s
        while (self.scheduler.active or self.gate.running) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        n = await self.scheduler.run_exclusive(self.sessions.drain)
        await self.scheduler.run_exclusive(self.sessions.flush)
        await self.directory.flush()
        with contextlib.suppress(DirectoryUnavailableError):
            await self.directory.leave(self.worker_id)
        return n

    async def stats(self) -> dict:
        st = await self.scheduler.run_exclusive(self.sessions.stats)
        return {"worker": self.worker_id, "node": self.node_id, "queue_depth": self.scheduler.active, "tiers": st,
                "free_slots": self.engine.slab.free_slots, "admission": self.gate.stats(),
                "directory_pending": len(self.directory.pending), "republished": self.republished,
                "shared_tier_up": self.epoch is not None}

    async def reconcile(self) -> None:
        """Replay what an outage kept back; after a restart of the directory's backend (another
        epoch), re-publish every session this worker holds (directory entry and transcript)."""
        try:
            epoch = await self.directory.epoch()
        except DirectoryUnavailableError:
            self.epoch = None
            return
        restarted = self.epoch is not None and epoch != self.epoch
        came_back = self.epoch is None
        self.epoch = epoch
        if restarted or came_back:
            held = await self.scheduler.run_exclusive(self.sessions.resident)
            claimed, stale = [], []
            for sid, (owner, turns) in held.items():
                entry = await self.directory.directory.place(sid, self.worker_id, owner, turns, if_newer=True)
                (claimed if entry is not None else stale).append(sid)
            for sid in stale:  # another worker served a later turn: this copy is stale
                await self.scheduler.run_exclusive(lambda sid=sid: self.sessions.drop_local(sid))
            self.republished += await self.scheduler.run_exclusive(lambda: self.sessions.republish(claimed))
        await self.directory.flush()
        await self.scheduler.run_exclusive(self.sessions.flush)

    async def _maintain_loop(self):
        while True:
            try:
                await self.reconcile()
                if not self.draining:
                    await self.scheduler.run_exclusive(self.sessions.maintain)
                self.state.report_worker.remote(self.worker_id, await self.stats())
            except Exception as e:  # noqa: BLE001 - maintenance is best effort; serving goes on
                log.warning("worker %s maintenance: %s: %s", self.worker_id, type(e).__name__, e)
            await asyncio.sleep(self.cfg.maintain_interval_s)

    def check_health(self) -> None:
        if not self.scheduler._thread.is_alive():
            raise RuntimeError("scheduler thread died")

    async def __del__(self):
        """Serve calls this when the replica leaves (scale-down, redeploy, shutdown)."""
        with contextlib.suppress(Exception):
            n = await self.drain()
            log.info("worker %s drained %d sessions", self.worker_id, n)
        self._maint.cancel()
        self.scheduler.close()
