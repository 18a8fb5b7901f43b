"""The router's HTTP application, built from a config and what it serves through (`RouterDeps`):
a turn backend (cluster/protocol.py), a metrics sink, the session directory, the response records
and a health probe. No Ray here: cluster/app.py builds the deps over Serve handles and the cluster's
stores, lessserve.testing.fake_backend in memory.

Rooms: the edge (cluster/http_edge.py: request id, API key, body limit, error handlers), chat
completions (cluster/chat_api.py), the Responses API (cluster/responses_api.py), both streaming
through cluster/streaming.py; the small endpoints (models, sessions, health, metrics) are here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from fastapi import APIRouter, FastAPI, Path
from fastapi.responses import JSONResponse, PlainTextResponse

from lessserve.cluster.chat_api import chat_routes
from lessserve.cluster.completions_api import completions_routes
from lessserve.cluster.config import ServeConfig
from lessserve.cluster.directory import DirectoryUnavailableError
from lessserve.cluster.http_edge import Edge, Owner, install_error_handlers
from lessserve.cluster.http_errors import ApiError
from lessserve.cluster.metrics import MetricsSink
from lessserve.cluster.openapi import ERRORS, install_openapi
from lessserve.cluster.protocol import SESSION_ID_PATTERN, TurnBackend, is_client_id, scoped_session
from lessserve.cluster.quotas import KeyQuotas, QuotaConfig
from lessserve.cluster.responses import ResponseStore
from lessserve.cluster.responses_api import responses_routes

log = logging.getLogger("ray.serve")
SESSION_PATH = Path(..., pattern=SESSION_ID_PATTERN, description="the conversation's id (X-Session-Id)")
SESSION_ERRORS = {k: ERRORS[k] for k in (400, 401, 404, 503)}


class SessionLookup(Protocol):
    async def lookup(self, sid: str) -> dict | None:
        """{"worker", "owner", ...} or None; DirectoryUnavailableError when unreachable."""
        ...

    async def count(self, sid_prefix: str) -> tuple[int, int]:
        """(entries, bytes) of the sessions whose ids start with `sid_prefix`."""
        ...


class HealthProbe(Protocol):
    async def check(self) -> dict:
        """{"status": "ok" | "degraded", "reasons": [...], "workers": int | None}."""
        ...


@dataclass
class RouterDeps:
    backend: TurnBackend
    metrics: MetricsSink
    directory: SessionLookup
    responses: ResponseStore
    health: HealthProbe


def key_quotas(cfg: QuotaConfig, directory: SessionLookup, responses: ResponseStore) -> KeyQuotas:
    """The quotas over the router's views of the shared state: a key's sessions are the directory
    entries under its scoped ids, its records those under its prefix."""
    return KeyQuotas(cfg, lambda owner: directory.count(scoped_session(owner, "")), responses.usage)


async def check_session(directory: SessionLookup, sid: str, owner: str) -> dict | None:
    """A session id as the worker knows it (`scope`d): not another owner's (404, as if unknown;
    with ids scoped by key this is a second line of defence). -> its directory entry; None when
    unknown or the directory is unreachable (the worker then checks the owner itself)."""
    try:
        entry = await directory.lookup(sid)
    except DirectoryUnavailableError as e:  # degraded: the worker checks the owner itself
        log.warning("session directory unavailable: %s", e)
        return None
    if entry and entry.get("owner") not in (None, owner):
        raise ApiError(404, f"session {sid!r} not found", "not_found_error", "session_not_found")
    return entry


class RouterContext:
    """What every endpoint shares: the config, the deps and the checks of a request."""

    def __init__(self, cfg: ServeConfig, deps: RouterDeps):
        self.cfg, self.deps = cfg, deps
        self.quotas = key_quotas(cfg.quotas, deps.directory, deps.responses)

    def check_request(self, model: str, max_tokens: int, param: str, n: int = 1) -> None:
        """The served model, the token limit (`param`: the field that set it), and `n` choices
        within one worker's slots (each choice decodes in a slot of its own)."""
        if n > self.cfg.engine.max_slots:
            raise ApiError(400, f"n {n} is over this server's {self.cfg.engine.max_slots} slots per worker", param="n")
        if model not in (self.cfg.model_name, self.cfg.engine.model):
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.cfg.model_name!r}",
                           "not_found_error", "model_not_found", "model")
        if max_tokens > self.cfg.max_tokens_limit:
            raise ApiError(400, f"{param} {max_tokens} is over this server's limit {self.cfg.max_tokens_limit}",
                           param=param)

    @staticmethod
    def scope(client_sid: str, owner: str) -> str:
        """A client's session id, checked (400), as the session of its key (workers/session_ids.py)."""
        if not is_client_id(client_sid):
            raise ApiError(400, "session id must be 1-128 characters of A-Z a-z 0-9 . _ : -", param="session_id")
        return scoped_session(owner, client_sid)

    async def check_session(self, sid: str, owner: str) -> dict | None:
        return await check_session(self.deps.directory, sid, owner)


def build_router_app(cfg: ServeConfig, deps: RouterDeps) -> FastAPI:
    app = FastAPI(title="lessserve", version="0.1.0",
                  description="OpenAI-compatible multi-turn chat over LESS-compressed session caches")
    ctx = RouterContext(cfg, deps)
    install_error_handlers(app, deps.metrics)
    app.add_middleware(Edge, keys=cfg.keys(), max_body_bytes=cfg.max_body_bytes, metrics=deps.metrics,
                       max_turns=cfg.router_max_turns)
    for routes in (chat_routes(ctx), completions_routes(ctx), responses_routes(ctx), service_routes(ctx)):
        app.include_router(routes)
    install_openapi(app, sorted({cfg.model_name, cfg.engine.model}))
    return app


def service_routes(ctx: RouterContext) -> APIRouter:
    api, deps, cfg = APIRouter(), ctx.deps, ctx.cfg

    @api.get("/v1/models", responses={401: ERRORS[401]})
    async def models(owner: Owner):
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "lessserve"}]}

    @api.get("/v1/sessions/{session_id}", responses=SESSION_ERRORS)
    async def session(owner: Owner, session_id: str = SESSION_PATH):
        sid = ctx.scope(session_id, owner)
        await ctx.check_session(sid, owner)
        info = await deps.backend.session_info(sid, owner)
        if info is None:
            raise ApiError(404, f"session {session_id!r} not found", "not_found_error", "session_not_found")
        return {**info, "id": session_id}

    @api.delete("/v1/sessions/{session_id}", responses=SESSION_ERRORS)
    async def delete_session(owner: Owner, session_id: str = SESSION_PATH):
        sid = ctx.scope(session_id, owner)
        entry = await ctx.check_session(sid, owner)
        existed = await deps.backend.delete_session(sid, owner)
        if not existed and entry is None:
            raise ApiError(404, f"session {session_id!r} not found", "not_found_error", "session_not_found")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @api.get("/healthz")
    async def healthz():
        """Liveness: 200 while this router answers; `status` says "degraded" with the reasons."""
        h = await deps.health.check()
        return {"status": h["status"], "reasons": h["reasons"], "model": cfg.model_name,
                "policy": cfg.engine.policy}

    @api.get("/readyz", responses={503: {"description": "no worker has reported in recently"}})
    async def readyz():
        """Readiness: 200 (status ok or degraded, with reasons) while turns can be served, else 503."""
        h = await deps.health.check()
        return JSONResponse(h, status_code=200 if h["workers"] != 0 else 503)

    @api.get("/metrics")
    async def metrics():
        return PlainTextResponse(await deps.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    return api
