"""The router's deps in a Ray Serve cluster: `ServeBackend`, the TurnBackend over the LessWorker
deployment's handle (session-affine: `handle.options(session_id=...)` reaches the custom request
router, cluster/routing.py), `StateMetrics` over the cluster-state actor, and `cluster_deps`, which
builds them with the session directory, the response records and the health probe from a config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from ray.exceptions import ActorUnavailableError, RayActorError

from lessserve.cluster.config import ServeConfig
from lessserve.cluster.directory import SessionDirectory
from lessserve.cluster.health import Health
from lessserve.cluster.http_errors import RETRY_AFTER_S, ApiError
from lessserve.cluster.metrics import MetricsSink
from lessserve.cluster.protocol import EndEvent, ErrorEvent, Event, TokenEvent, TurnRequest
from lessserve.cluster.responses import ResponseStore
from lessserve.cluster.router import RouterDeps
from lessserve.cluster.shared_state import shared_kv
from lessserve.cluster.state import get_state
from lessserve.errors.tree import DependencyUnavailableError

log = logging.getLogger("ray.serve")
WORKER_GONE = (RayActorError, ActorUnavailableError)  # the replica died or is unreachable


def worker_gone(e: BaseException) -> ApiError:
    return ApiError(503, f"the worker running this turn went away: {type(e).__name__}", "service_unavailable",
                    "worker_unavailable", retry_after=RETRY_AFTER_S)


class ServeBackend:
    """TurnBackend over Serve handles. A turn's events are held back until it is committed (its
    first token when streamed, all of it otherwise): a worker that dies before then is replaced by
    another, which rebuilds the session from the request's history, up to `retries` times."""

    def __init__(self, worker, retries: int, metrics: MetricsSink, backoff_s: float = 0.5):
        self.worker, self.retries, self.metrics, self.backoff_s = worker, retries, metrics, backoff_s

    def _handle(self, sid: str | None, stream: bool = False):
        opts = {"stream": True} if stream else {}
        return self.worker.options(**opts, session_id=sid) if sid else self.worker.options(**opts)

    async def turn(self, req: TurnRequest, *, stream: bool) -> AsyncIterator[Event]:
        gen, held = await self._start(req, stream)
        for ev in held:
            yield ev
        try:
            async for ev in gen:
                yield ev
        except WORKER_GONE as e:
            raise worker_gone(e) from None

    async def _start(self, req: TurnRequest, stream: bool) -> tuple[AsyncIterator[Event], list[Event]]:
        for attempt in range(self.retries + 1):
            gen, held = self._handle(req.affinity, stream=True).chat.remote(req), []
            try:
                async for ev in gen:
                    held.append(ev)
                    if isinstance(ev, ErrorEvent) or (stream and isinstance(ev, TokenEvent | EndEvent)):
                        break
                return gen, held
            except WORKER_GONE as e:
                if attempt == self.retries:
                    raise ApiError(503, f"no worker could run the turn: {type(e).__name__}", "service_unavailable",
                                   "worker_unavailable", retry_after=RETRY_AFTER_S) from None
                log.warning("worker died before the first token (%s); retrying the turn elsewhere", type(e).__name__)
                self.metrics.record_retry()
                await asyncio.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    async def session_info(self, session_id: str, owner: str) -> dict | None:
        try:
            return await self._handle(session_id).session_info.remote(session_id, owner)
        except WORKER_GONE as e:
            raise worker_gone(e) from None

    async def delete_session(self, session_id: str, owner: str) -> bool:
        try:
            return await self._handle(session_id).delete_session.remote(session_id, owner)
        except WORKER_GONE as e:
            raise worker_gone(e) from None


class StateUnavailableError(DependencyUnavailableError):
    """The cluster-state actor (metrics without Redis) did not answer."""


class StateMetrics:
    """MetricsSink over the cluster-state actor: records are fire and forget."""

    def __init__(self, state):
        self.state = state

    def record_request(self, ttft: float | None, itls: list[float], tokens_out: int, prefilled: int) -> None:
        self.state.record_request.remote(ttft, itls, tokens_out, prefilled)

    def record_error(self, status: int) -> None:
        try:
            self.state.record_error.remote(status)
        except Exception:  # noqa: BLE001 - best effort: never fails a response
            pass

    def record_retry(self) -> None:
        self.state.record_retry.remote()

    async def prometheus(self) -> str:
        try:
            return await self.state.prometheus.remote()
        except WORKER_GONE as e:
            raise StateUnavailableError(f"cluster state actor: {type(e).__name__}") from e


def cluster_deps(cfg: ServeConfig, worker) -> RouterDeps:
    """The router's deps in a replica: `worker` is the LessWorker deployment's handle."""
    state = get_state(cfg.store)
    metrics = StateMetrics(state)
    kv = shared_kv(cfg.store)  # the directory and the Responses records: views over one KV
    directory = SessionDirectory(kv)
    responses = ResponseStore(kv, cfg.responses_ttl_s, cfg.responses_max_records)
    return RouterDeps(
        backend=ServeBackend(worker, cfg.turn_retries, metrics),
        metrics=metrics,
        directory=directory,
        responses=responses,
        health=Health(directory, state, kv.name == "redis", worker_stale_s=3 * cfg.maintain_interval_s + 10),
    )
