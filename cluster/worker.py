"""The worker deployment: one replica = one model + slot slab + tiered cache store +
continuous-batching scheduler. `chat` takes one TurnRequest and streams the protocol's events back
to the router (cluster/protocol.py): StartEvent, TokenEvent..., EndEvent, or an ErrorEvent.

Concurrency: two threads. The actor's event loop runs the turns and awaits every shared-state call
(Redis or the cluster-state actor: the directory, transcripts, the shared cache tier); per session
turns run in arrival order (SessionLocks), at most `max_slots` at once (TurnGate, the rest wait or
get 503). The scheduler thread owns the engine, the slot slab and the device and host tiers: the
SessionStore reaches them between forward passes (BatchScheduler.run_exclusive). A turn is one
resource (SessionStore.turn): whatever ends it, cancellation included, it is closed and unpinned.

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

from lessserve.cluster.admission import SessionBusyError, TurnGate
from lessserve.cluster.choices import TokenTexts, choice_events, sampling_params
from lessserve.cluster.config import ServeConfig
from lessserve.cluster.directory import DirectoryUnavailableError, SessionDirectory, WriteBehind
from lessserve.cluster.http_errors import http_error
from lessserve.cluster.protocol import ErrorEvent, StartEvent, TurnRequest, private_session
from lessserve.cluster.shared_state import shared_kv
from lessserve.cluster.state import get_state
from lessserve.errors.tree import DependencyUnavailableError, LessServeError
from lessserve.workers.chat_session import ChatMessages, supports_tools
from lessserve.workers.engine import Engine
from lessserve.workers.errors import RequestError, ToolChoiceError
from lessserve.workers.scheduler import BatchScheduler
from lessserve.workers.session_store import SessionStore, settle
from lessserve.workers.threads import reserve_compute_threads
from lessserve.workers.tool_parsers import parser_for

log = logging.getLogger("ray.serve")


class SessionLocks:
    """One FIFO lock per session, kept only while someone holds or waits for it."""

    def __init__(self):
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, sid: str, deadline: float | None = None):
        """`deadline` (loop time): past it while waiting, SessionBusyError (a 503 with Retry-After)."""
        lock, users = self._locks.get(sid, (asyncio.Lock(), 0))
        self._locks[sid] = (lock, users + 1)
        try:
            if deadline is None:
                await lock.acquire()
            else:
                try:
                    await asyncio.wait_for(lock.acquire(), max(deadline - asyncio.get_running_loop().time(), 0))
                except TimeoutError:
                    raise SessionBusyError(f"session {sid!r}: its previous turn is still running; "
                                           "retry shortly") from None
            try:
                yield
            finally:
                lock.release()
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
        self.scheduler = BatchScheduler(self.engine, threads=threads)  # the one thread that touches the engine
        self.texts = TokenTexts(self.engine)
        kv = shared_kv(self.cfg.store)  # Redis or the cluster-state actor: one client, on this loop
        self.sessions = SessionStore(self.engine, self.cfg.store, kv=kv, run_local=self.scheduler.run_exclusive)
        self.worker_id = _replica_id()
        self.node_id = _node_id()
        # an entry outlives its session by no more than its transcript does
        self.directory = WriteBehind(SessionDirectory(kv, ttl_s=self.cfg.store.transcript_ttl_s))
        self.state = get_state(self.cfg.store)
        self.locks = SessionLocks()
        self.gate = TurnGate(self.cfg.engine.max_slots, self.cfg.queue_depth, self.cfg.queue_max_wait_s)
        self.draining = False
        self.epoch: str | None = None  # the directory backend's epoch last seen (None: unreachable)
        self.republished = 0
        self._maint = asyncio.get_event_loop().create_task(self._maintain_loop())

    # --- turns ------------------------------------------------------------------------------
    async def chat(self, req: TurnRequest):
        """One turn. `req.fork_from`: the new session starts as a copy of that one's cache (a response
        continuing another, cluster/responses_api.py); `req.ephemeral`: forget the session afterwards."""
        sid = req.session_id or private_session("oneoff", uuid.uuid4().hex)
        deadline = self.gate.deadline()  # the session's lock and a slot: one wait limit, queue_max_wait_s
        try:
            async with self.locks.hold(sid, deadline):  # turns of one session run in arrival order
                try:
                    async with self.gate.admit(deadline):  # at most max_slots turns at once; the rest wait
                        if req.fork_from:
                            async with self.locks.hold(req.fork_from, deadline):  # never copy a slot mid-turn
                                await self.sessions.fork(req.fork_from, sid, req.owner)
                        async for ev in self._turn(sid, req):
                            yield ev
                finally:
                    if req.session_id is None or req.ephemeral:
                        await self._forget_after_turn(sid, req.ephemeral)
        except LessServeError as e:  # a CapacityError of the waits: answered from the one table
            yield ErrorEvent(http_error(e))

    async def _forget_after_turn(self, sid: str, ephemeral: bool) -> None:
        """A one-off (a completion, a chat without a session id) or `store: false` session ends with
        its turn. Beyond this worker it is best effort: with the shared state down, the local copies
        are gone and what Redis holds expires with its TTLs; the reply the client has stands."""
        try:
            await settle(self.sessions.delete(sid))
            if ephemeral:
                await settle(self.directory.forget(sid))
        except DependencyUnavailableError as e:
            log.warning("worker %s: session %s forgotten locally only: %s", self.worker_id, sid, e)

    async def _turn(self, sid: str, req: TurnRequest):
        try:
            prompt_ids = self._prompt_ids(req)
            self._check_tools(req)
            constraint = await asyncio.to_thread(self.engine.grammars.constraint, req.grammar) if req.grammar else None
            messages = ChatMessages(req.messages, req.tools) if req.tools else req.messages
            async with self.sessions.turn(sid, messages, req.max_tokens, req.owner, prompt_ids) as opened:
                forks = await self.sessions.borrow_slots(req.n - 1)  # the other choices' slots, for this turn
                try:
                    async for ev in self._generate(sid, req, *opened, constraint, forks):
                        yield ev
                finally:
                    await settle(self.sessions.return_slots(forks))
        except LessServeError as e:  # a known condition: answered from the one table (cluster/http_errors.py)
            yield ErrorEvent(http_error(e))

    def _check_tools(self, req: TurnRequest) -> None:
        template = getattr(self.engine.tokenizer, "chat_template", None)
        if req.auto_tools and parser_for(template) is None:
            why = "renders no tools" if not supports_tools(self.engine.tokenizer) \
                else "uses a call syntax with no parser here"
            raise ToolChoiceError(f"tool_choice: 'auto' (the default with tools) needs a chat template that renders "
                                  f"tools and a parser of the model's calls; this model's template {why}. Send "
                                  "tool_choice 'required' or name a function (enforced by a grammar), or 'none'")

    def _prompt_ids(self, req: TurnRequest) -> list[int] | None:
        if req.prompt is None:
            return None
        if isinstance(req.prompt, str):
            return self.engine.tokenizer(req.prompt)["input_ids"]  # with the tokenizer's own special tokens
        vocab = self.engine.args.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt):
            raise RequestError(f"prompt: token ids must lie in [0, {vocab})")
        return list(req.prompt)

    async def _generate(self, sid: str, req: TurnRequest, session, new_ids: list[int], tokens: list[int],
                        constraint, forks: list[int]):
        """The opened turn's events; `tokens` receives every sampled token of choice 0 (the turn
        closes with them)."""
        if req.session_id is not None:  # this worker serves the latest turn: it holds the current copy
            await self.directory.place(sid, self.worker_id, req.owner, sum(m["role"] == "user" for m in req.messages))
        prefilled = len(new_ids)  # what this turn computes, a rebuild's or a new prompt's included: not cached
        yield StartEvent(prompt_tokens=len(session.transcript.ids), prefilled=prefilled)
        params = sampling_params(self.engine, req, constraint, forks)
        async for ev in choice_events(self.engine, self.scheduler, self.texts, req, session.slot, new_ids, params,
                                      tokens, session.marks):
            yield ev

    # --- sessions ---------------------------------------------------------------------------
    async def session_info(self, session_id: str, owner: str | None = None) -> dict | None:
        info = await self.sessions.info(session_id, owner)
        return None if info is None else {"id": session_id, "worker": self.worker_id, "node": self.node_id, **info}

    async def delete_session(self, session_id: str, owner: str | None = None) -> bool:
        async with self.locks.hold(session_id):
            existed = await self.sessions.delete(session_id, owner)
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
        n = await self.sessions.drain()
        await self.sessions.flush()
        await self.directory.flush()
        with contextlib.suppress(DirectoryUnavailableError):
            await self.directory.leave(self.worker_id)
        with contextlib.suppress(Exception):  # best effort: a worker that stops reporting goes stale anyway
            await asyncio.wait_for(self.state.worker_left.remote(self.worker_id), self.cfg.store.redis_timeout_s)
        return n

    async def stats(self) -> dict:
        st = await self.sessions.stats()
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
            held = await self.sessions.resident()
            claimed, stale = [], []
            for sid, (owner, turns) in held.items():
                entry = await self.directory.directory.place(sid, self.worker_id, owner, turns, if_newer=True)
                (claimed if entry is not None else stale).append(sid)
            for sid in stale:  # another worker served a later turn: this copy is stale
                await self.sessions.drop_local(sid)
            self.republished += await self.sessions.republish(claimed)
        await self.directory.flush()
        await self.sessions.flush()

    async def _maintain_loop(self):
        while True:
            try:
                await self.reconcile()
                if not self.draining:
                    await self.sessions.maintain()
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
