"""What every HTTP request passes through around its endpoint: a request id on every response, the
API key of /v1 requests and the body-size limit (both before anything reads the body), and the
exception handlers that answer every error from the one table (cluster/http_errors.py) with an
OpenAI-style body, counted in /metrics."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lessserve.cluster.auth import owner_of
from lessserve.cluster.http_errors import ApiError, HttpError, http_error
from lessserve.cluster.metrics import MetricsSink
from lessserve.cluster.openai_types import error_body
from lessserve.errors.tree import CapacityError, LessServeError

log = logging.getLogger("ray.serve")
API_PREFIX = "/v1/"  # every path under it needs a key (when the server has keys)


def answer(h: HttpError, metrics: MetricsSink) -> JSONResponse:
    metrics.record_error(h.status)
    headers = {"Retry-After": str(h.retry_after)} if h.retry_after is not None else None
    return JSONResponse(error_body(h.message, h.type, h.param, h.code), status_code=h.status, headers=headers)


def validation_error(errors: list[dict]) -> HttpError:
    """A 400 naming the field: `field: msg`. Body errors name the field alone (a check across
    fields names its field first in its message); others keep their place ("path.session_id")."""
    err = errors[0] if errors else {}
    loc, kind, msg = tuple(err.get("loc", ())), err.get("type"), str(err.get("msg", "invalid request"))
    if loc[:1] != ("body",):
        return HttpError(400, "invalid_request_error", None, f"{'.'.join(map(str, loc))}: {msg}")
    if kind == "json_invalid":
        return HttpError(400, "invalid_request_error", None,
                         f"malformed JSON body: {err.get('ctx', {}).get('error')} (char {loc[-1]})")
    if len(loc) == 1 and not isinstance(err.get("input"), dict):
        what = {"missing": "malformed JSON body: the body is empty"}.get(kind, "the JSON body must be an object")
        if isinstance(err.get("input"), bytes | bytearray):
            what = "the body must be JSON, sent with Content-Type: application/json"
        return HttpError(400, "invalid_request_error", None, what)
    field, msg = ".".join(map(str, loc[1:])), msg.removeprefix("Value error, ")
    if not field and ": " in msg:
        field, msg = msg.split(": ", 1)
    return HttpError(400, "invalid_request_error", None, f"{field}: {msg}", field or None)


def install_error_handlers(app: FastAPI, metrics: MetricsSink) -> None:
    @app.exception_handler(LessServeError)
    async def _known(request: Request, e: LessServeError):
        return answer(http_error(e), metrics)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return answer(validation_error(list(e.errors())), metrics)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):  # unknown path, wrong method: not counted
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), type_), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        known = http_error(e)  # a known error a worker raised, wrapped by Ray
        if known:
            return answer(known, metrics)
        rid = getattr(request.state, "request_id", "-")
        log.error("request %s: unexpected %s", rid, type(e).__name__, exc_info=e)
        out = answer(HttpError(500, "server_error", "internal_error",
                               f"internal error {type(e).__name__} (request id {rid})"), metrics)
        out.headers["x-request-id"] = rid  # answered outside Edge (Starlette's outermost error middleware)
        return out


def _owner(request: Request) -> str:
    return request.state.owner


Owner = Annotated[str, Depends(_owner)]  # the key's owner (cluster/auth.py), as Edge found it


class RouterBusyError(CapacityError):
    """This router replica serves as many turns as it may (router_max_turns)."""


class Edge:
    """ASGI middleware, outermost: the request id (the client's x-request-id, or a fresh one, on
    every response and in request.state), the owner of a /v1 request (request.state.owner; 401
    without a valid key) and, for a POST, a place among the replica's `max_turns` turns (503 with
    Retry-After past it, held until the response, a stream included, ends) and the body read up to
    `max_body_bytes` (413 past it) and handed on. All before FastAPI parses anything, in that
    order. Probes, metrics and GETs take no place: they never wait behind turns."""

    def __init__(self, app: ASGIApp, keys: set[str], max_body_bytes: int, metrics: MetricsSink,
                 max_turns: int | None = None):
        self.app, self.keys, self.max_body_bytes, self.metrics = app, keys, max_body_bytes, metrics
        self.max_turns, self.turns = max_turns, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        rid = headers.get("x-request-id") or "req-" + uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*kept, (b"x-request-id", rid.encode("latin-1"))]}
            await send(message)

        turn = scope["path"].startswith(API_PREFIX) and scope["method"] == "POST"
        try:
            if scope["path"].startswith(API_PREFIX):
                state["owner"] = owner_of(headers.get("authorization"), self.keys)
                if turn:
                    if self.max_turns is not None and self.turns >= self.max_turns:
                        raise RouterBusyError(f"this router serves {self.turns} turns, its limit; retry shortly")
                    body = await self._body(headers, receive)
                    if body is None:  # the client left while sending
                        return
                    receive = _replay(body, receive)
        except LessServeError as e:
            return await answer(http_error(e), self.metrics)(scope, receive, send_with_id)
        if not turn:
            return await self.app(scope, receive, send_with_id)
        self.turns += 1
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.turns -= 1

    async def _body(self, headers: Headers, receive: Receive) -> bytes | None:
        try:
            declared = int(headers.get("content-length") or 0)
        except ValueError:
            raise ApiError(400, "content-length is not an integer") from None
        if declared > self.max_body_bytes:
            raise ApiError(413, f"request body over {self.max_body_bytes} bytes")
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_body_bytes:
                raise ApiError(413, f"request body over {self.max_body_bytes} bytes")
            if not message.get("more_body", False):
                return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read once, then the real channel (a streamed response listens there for the
    client's disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
