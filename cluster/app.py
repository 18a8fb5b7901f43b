"""The Ray Serve application: a stateless FastAPI router in front of session-affine workers.

`build_app(args)` is the import path for `serve run` / `serve deploy` / a RayService
(`lessserve.cluster.app:build_app`); `args` is a ServeConfig mapping.
"""


import asyncio
import contextlib
import json
import logging
import re
import time
import uuid

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from lessserve.cluster.auth import owner_of
from lessserve.cluster.config import ServeConfig, load_config
from lessserve.cluster.directory import DirectoryUnavailableError, SessionDirectory
from lessserve.cluster.health import Health
from lessserve.cluster.http_errors import RETRY_AFTER_S, ApiError, HttpError, http_error
from lessserve.cluster.metrics import TokenTimer
from lessserve.cluster.openai_types import (
    SESSION_ID_PATTERN,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    usage,
)
from lessserve.cluster.openapi import CHAT_EXTRA, ERRORS, RESPONSES_EXTRA, install
from lessserve.cluster.responses import ResponseStore
from lessserve.cluster.responses_types import (
    RESPONSE_ID_PATTERN,
    EventStream,
    ResponsesRequest,
    now,
    response_id,
    response_object,
    response_usage,
)
from lessserve.cluster.shared_state import shared_kv
from lessserve.cluster.state import get_state
from lessserve.cluster.worker import LessWorker
from lessserve.errors.tree import LessServeError

app = FastAPI(title="lessserve", version="0.1.0",
              description="OpenAI-compatible multi-turn chat over LESS-compressed session caches")
install(app)
_SID = re.compile(SESSION_ID_PATTERN)
log = logging.getLogger("ray.serve")


def _err(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
         param: str | None = None, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _answer(h: HttpError) -> JSONResponse:
    _count(h.status)
    return _err(h.status, h.message, h.type, h.code, h.param, h.retry_after)


_STATE: list = []


def _count(status: int) -> None:
    """Error counters in /metrics (best effort: never fails a response)."""
    try:
        if not _STATE:
            _STATE.append(get_state())
        _STATE[0].record_error.remote(status)
    except Exception:  # noqa: BLE001
        pass


@app.middleware("http")
async def _request_id(request: Request, call_next):
    """Every response carries x-request-id (the client's, or a fresh one): the log names it."""
    request.state.request_id = request.headers.get("x-request-id") or "req-" + uuid.uuid4().hex[:16]
    response = await call_next(request)
    response.headers["x-request-id"] = request.state.request_id
    return response


@app.exception_handler(LessServeError)
async def _known_error(request: Request, e: LessServeError):
    return _answer(http_error(e))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    _count(400)
    return _err(400, f"{'.'.join(map(str, first.get('loc', [])))}: {first.get('msg', 'invalid request')}")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    return _err(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error")


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception):
    known = http_error(e)  # a known error a worker raised, wrapped by Ray
    if known:
        return _answer(known)
    if isinstance(e, WORKER_GONE):
        return _answer(HttpError(503, "service_unavailable", "worker_unavailable",
                                 f"the worker running this turn went away: {type(e).__name__}",
                                 retry_after=RETRY_AFTER_S))
    rid = getattr(request.state, "request_id", "-")
    log.error("request %s: unexpected %s", rid, type(e).__name__, exc_info=e)
    _count(500)
    return _err(500, f"internal error {type(e).__name__} (request id {rid})", "server_error", "internal_error")


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    """-> (message naming the field, the field). A check across fields names its field first."""
    err = e.errors()[0]
    loc, msg = ".".join(str(x) for x in err["loc"]), err["msg"].removeprefix("Value error, ")
    if not loc and ": " in msg:
        loc, msg = msg.split(": ", 1)
    return f"{loc}: {msg}", loc or None


def collect(events: list[dict], t0: float) -> tuple[str, dict, TokenTimer]:
    """A whole (non-streamed) turn's events -> (text, end event, timer); an error event raises."""
    text, end, timer = [], {}, TokenTimer(t0)
    for ev in events:
        if ev["type"] == "token":
            timer.tick()
            text.append(ev["text"])
        elif ev["type"] == "end":
            end = ev
        elif ev["type"] == "error":
            raise HttpError.from_event(ev).api_error()
    return "".join(text), end, timer


async def rest(gen, seen: list[dict]):
    """A streamed turn's events after its start event: those already read, then the rest."""
    for ev in seen[1:]:
        yield ev
    async for ev in gen:
        yield ev


WORKER_GONE = (RayActorError, ActorUnavailableError)  # the replica died or is unreachable
SESSION_PATH = Path(..., pattern=SESSION_ID_PATTERN, description="the conversation's id (X-Session-Id)")
RESPONSE_PATH = Path(..., pattern=RESPONSE_ID_PATTERN, description="a response's id (resp_...)")
RESPONSE_SESSION = "~r-"  # a response's own session: outside SESSION_ID_PATTERN, so no client can name it


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    def __init__(self, worker, config: dict):
        self.cfg = ServeConfig.model_validate(config)
        self.worker = worker
        self.keys = self.cfg.keys()
        kv = shared_kv(self.cfg.store)  # the directory and the Responses records: views over one KV
        self.directory = SessionDirectory(kv)
        self.state = get_state()
        install(app, sorted({self.cfg.model_name, self.cfg.engine.model}))
        self.responses = ResponseStore(kv, self.cfg.responses_ttl_s, self.cfg.responses_max_records)
        self.health = Health(self.directory, self.state, kv.name == "redis",
                             worker_stale_s=3 * self.cfg.maintain_interval_s + 10)

    # --- helpers ----------------------------------------------------------------------------
    def _owner(self, request: Request) -> str:
        return owner_of(request.headers.get("authorization"), self.keys)

    async def _check_session(self, sid: str, owner: str) -> dict | None:
        if not _SID.fullmatch(sid):  # match() would let "$" accept a trailing newline
            raise ApiError(400, "session id must be 1-128 characters of A-Z a-z 0-9 . _ : -", param="session_id")
        try:
            entry = await self.directory.lookup(sid)
        except DirectoryUnavailableError as e:  # degraded: the worker checks the owner itself
            log.warning("session directory unavailable: %s", e)
            return None
        if entry and entry.get("owner") not in (None, owner):
            raise ApiError(404, f"session {sid!r} not found", "not_found_error", "session_not_found")
        return entry

    async def _body(self, request: Request) -> bytes:
        """The raw JSON object of the body, checked for size and well-formedness."""
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            raise ApiError(400, "content-length is not an integer") from None
        if declared > self.cfg.max_body_bytes:
            raise ApiError(413, f"request body over {self.cfg.max_body_bytes} bytes")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > self.cfg.max_body_bytes:
                raise ApiError(413, f"request body over {self.cfg.max_body_bytes} bytes")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the JSON body must be an object")
        return raw

    async def _start(self, sid: str | None, args: tuple, streamed: bool) -> tuple:
        """Start a turn on a worker and read it up to its first token (all of it when not
        streamed). A worker that dies before then is replaced by another (the turn is rebuilt from
        the request's history; nothing reached the client), up to `turn_retries` times.
        -> (event generator, events read so far)."""
        for attempt in range(self.cfg.turn_retries + 1):
            handle = self.worker.options(stream=True, session_id=sid) if sid else self.worker.options(stream=True)
            gen, seen = handle.chat.remote(*args), []
            try:
                async for ev in gen:
                    seen.append(ev)
                    if ev["type"] == "error" or (streamed and ev["type"] in ("token", "end")):
                        break
                return gen, seen
            except WORKER_GONE as e:
                if attempt == self.cfg.turn_retries:
                    raise ApiError(503, f"no worker could run the turn: {type(e).__name__}", "service_unavailable",
                                   "worker_unavailable", retry_after=RETRY_AFTER_S) from None
                log.warning("worker died before the first token (%s); retrying the turn elsewhere", type(e).__name__)
                self.state.record_retry.remote()
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    async def _parse(self, request: Request, model: type[BaseModel]) -> BaseModel:
        """The request body as `model`; strict: a wrong JSON type is a 400 naming the field, never
        coerced ("0.5" is not a temperature)."""
        raw = await self._body(request)
        try:
            return model.model_validate_json(raw, strict=True)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise ApiError(400, msg, param=param) from None

    def _check_request(self, model: str, max_tokens: int, param: str) -> None:
        """The served model, and the token limit (`param`: the field that set it)."""
        if model not in (self.cfg.model_name, self.cfg.engine.model):
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.cfg.model_name!r}",
                           "not_found_error", "model_not_found", "model")
        if max_tokens > self.cfg.max_tokens_limit:
            raise ApiError(400, f"{param} {max_tokens} is over this server's limit {self.cfg.max_tokens_limit}",
                           param=param)

    # --- endpoints --------------------------------------------------------------------------
    @app.post("/v1/chat/completions", responses=ERRORS, openapi_extra=CHAT_EXTRA,
              summary="Chat completion (OpenAI-compatible); X-Session-Id keeps the conversation's cache")
    async def chat_completions(self, request: Request):
        t0 = time.perf_counter()
        owner = self._owner(request)
        req = await self._parse(request, ChatCompletionRequest)
        max_tokens = req.max_completion_tokens or req.max_tokens or self.cfg.default_max_tokens
        self._check_request(req.model, max_tokens, "max_tokens")
        sid = request.headers.get("x-session-id") or req.session_id
        if sid:
            await self._check_session(sid, owner)
        messages = [m.plain() for m in req.messages]
        args = (sid, owner, messages, max_tokens, req.temperature, req.top_p, req.seed, req.stop_list())
        gen, seen = await self._start(sid, args, streamed=req.stream)
        first = seen[0]
        if first["type"] == "error":
            raise HttpError.from_event(first).api_error()
        cid, model = completion_id(), self.cfg.model_name
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return StreamingResponse(self._sse(gen, seen, cid, model, include_usage, t0),
                                     media_type="text/event-stream")
        text, end, timer = collect(seen[1:], t0)
        use = usage(first["prompt_tokens"], end.get("completion_tokens", 0), first["prefilled"])
        self.state.record_request.remote(timer.ttft, timer.itls, use["completion_tokens"], first["prefilled"])
        return JSONResponse(completion_body(cid, model, text, end.get("finish_reason", "length"), use),
                            headers={"x-session-id": sid} if sid else None)

    async def _sse(self, gen, seen: list[dict], cid: str, model: str, include_usage: bool, t0: float):
        send = lambda body: f"data: {json.dumps(body)}\n\n"  # noqa: E731
        yield send(chunk_body(cid, model, {"role": "assistant", "content": ""}))
        timer, end, first = TokenTimer(t0), {}, seen[0]
        try:
            async for ev in rest(gen, seen):
                if ev["type"] == "token":
                    timer.tick()
                    yield send(chunk_body(cid, model, {"content": ev["text"]}))
                elif ev["type"] == "end":
                    end = ev
                elif ev["type"] == "error":
                    raise HttpError.from_event(ev).api_error()
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band, then end it
            h = http_error(e)
            log.warning("stream of %s ended by %s: %s", cid, type(e).__name__, e)
            yield send(error_body(f"generation failed: {h.message if h else type(e).__name__}",
                                  h.type if h else "server_error", code=h.code if h else "stream_interrupted"))
            yield "data: [DONE]\n\n"
            return
        use = usage(first["prompt_tokens"], end.get("completion_tokens", 0), first["prefilled"])
        yield send(chunk_body(cid, model, {}, end.get("finish_reason", "length")))
        if include_usage:
            body = chunk_body(cid, model, {}, use=use)
            body["choices"] = []
            yield send(body)
        yield "data: [DONE]\n\n"
        self.state.record_request.remote(timer.ttft, timer.itls, use["completion_tokens"], first["prefilled"])

    # --- the Responses API ------------------------------------------------------------------

    @app.post("/v1/responses", responses=ERRORS, openapi_extra=RESPONSES_EXTRA,
              summary="Create a response (OpenAI Responses API); previous_response_id continues or forks")
    async def responses_create(self, request: Request):
        t0 = time.perf_counter()
        owner = self._owner(request)
        req = await self._parse(request, ResponsesRequest)
        max_tokens = req.max_output_tokens or self.cfg.default_max_tokens
        self._check_request(req.model, max_tokens, "max_output_tokens")
        history, parent = [], None
        if req.previous_response_id:
            prev = await self.responses.get(req.previous_response_id, owner)
            history, parent = prev["messages"], prev["session"]
        new = req.messages()
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        rid = response_id()
        sid = RESPONSE_SESSION + rid[5:]  # one session per response: its cache is the conversation at that point
        rec = {"id": rid, "owner": owner, "session": sid, "created_at": now(), "model": self.cfg.model_name,
               "messages": [*history, *new], "previous_response_id": req.previous_response_id,
               "instructions": req.instructions, "metadata": req.metadata, "temperature": req.temperature,
               "top_p": req.top_p, "max_output_tokens": req.max_output_tokens, "store": req.store}
        args = (sid, owner, [*system, *history, *new], max_tokens, req.temperature, req.top_p, None, [], parent,
                not req.store)
        gen, seen = await self._start(parent or sid, args, streamed=req.stream)
        if seen[0]["type"] == "error":
            raise HttpError.from_event(seen[0]).api_error()
        if req.stream:
            return StreamingResponse(self._responses_sse(gen, seen, rec, t0), media_type="text/event-stream")
        text, end, timer = collect(seen[1:], t0)
        await self._finish_response(rec, seen[0], end, text, timer)
        return JSONResponse(response_object(rec))

    async def _finish_response(self, rec: dict, first: dict, end: dict, text: str, timer: TokenTimer) -> None:
        rec.update(output_text=text, finish=end.get("finish_reason", "length"),
                   usage=response_usage(first["prompt_tokens"], end.get("completion_tokens", 0), first["prefilled"]))
        rec["messages"] = [*rec["messages"], {"role": "assistant", "content": text}]
        if rec["store"]:
            await self.responses.put(rec)
        self.state.record_request.remote(timer.ttft, timer.itls, rec["usage"]["output_tokens"], first["prefilled"])

    async def _responses_sse(self, gen, seen: list[dict], rec: dict, t0: float):
        es, text, timer, end = EventStream(rec), [], TokenTimer(t0), {}
        for chunk in es.opening():
            yield chunk
        try:
            async for ev in rest(gen, seen):
                if ev["type"] == "token":
                    timer.tick()
                    text.append(ev["text"])
                    yield es.delta(ev["text"])
                elif ev["type"] == "end":
                    end = ev
                elif ev["type"] == "error":
                    raise HttpError.from_event(ev).api_error()
            await self._finish_response(rec, seen[0], end, "".join(text), timer)
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band, then end it
            h = http_error(e)
            log.warning("response stream %s ended by %s: %s", rec["id"], type(e).__name__, e)
            yield es.error(h.code if h else "stream_interrupted", h.message if h else type(e).__name__)
            return
        for chunk in es.closing(rec):
            yield chunk

    @app.get("/v1/responses/{response_id}", responses={k: ERRORS[k] for k in (401, 404, 503)})
    async def responses_get(self, request: Request, response_id: str = RESPONSE_PATH):
        return response_object(await self.responses.get(response_id, self._owner(request)))

    @app.delete("/v1/responses/{response_id}", responses={k: ERRORS[k] for k in (401, 404, 503)})
    async def responses_delete(self, request: Request, response_id: str = RESPONSE_PATH):
        owner = self._owner(request)
        rec = await self.responses.delete(response_id, owner)
        with contextlib.suppress(Exception):  # the record is gone; its cache expires with the tiers if this fails
            await self.worker.options(session_id=rec["session"]).delete_session.remote(rec["session"], owner)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.get("/v1/models", responses={401: ERRORS[401]})
    async def models(self, request: Request):
        self._owner(request)
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "lessserve"}]}

    @app.get("/v1/sessions/{session_id}", responses={k: ERRORS[k] for k in (400, 401, 404, 503)})
    async def session(self, request: Request, session_id: str = SESSION_PATH):
        owner = self._owner(request)
        await self._check_session(session_id, owner)
        info = await self.worker.options(session_id=session_id).session_info.remote(session_id, owner)
        if info is None:
            raise ApiError(404, f"session {session_id!r} not found", "not_found_error", "session_not_found")
        return info

    @app.delete("/v1/sessions/{session_id}", responses={k: ERRORS[k] for k in (400, 401, 404, 503)})
    async def delete_session(self, request: Request, session_id: str = SESSION_PATH):
        owner = self._owner(request)
        entry = await self._check_session(session_id, owner)
        existed = await self.worker.options(session_id=session_id).delete_session.remote(session_id, owner)
        if not existed and entry is None:
            raise ApiError(404, f"session {session_id!r} not found", "not_found_error", "session_not_found")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.get("/healthz")
    async def healthz(self):
        """Liveness: 200 while this router answers; `status` says "degraded" with the reasons."""
        h = await self.health.check()
        return {"status": h["status"], "reasons": h["reasons"], "model": self.cfg.model_name,
                "policy": self.cfg.engine.policy}

    @app.get("/readyz", responses={503: {"description": "no worker has reported in recently"}})
    async def readyz(self):
        """Readiness: 200 (status ok or degraded, with reasons) while turns can be served, else 503."""
        h = await self.health.check()
        return JSONResponse(h, status_code=200 if h["workers"] != 0 else 503)

    @app.get("/metrics")
    async def metrics(self):
        return PlainTextResponse(await self.state.prometheus.remote(), media_type="text/plain; version=0.0.4")


def worker_deployment(cfg: ServeConfig):
    w = cfg.workers
    gpus = cfg.worker_num_gpus
    if gpus is None:
        import ray

        gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return serve.deployment(LessWorker, name="LessWorker").options(
        autoscaling_config={
            "min_replicas": w.min_workers, "max_replicas": w.max_workers,
            "initial_replicas": w.initial_workers if w.initial_workers is not None else w.min_workers,
            "target_ongoing_requests": w.target_ongoing_requests,
            "upscale_delay_s": w.upscale_delay_s, "downscale_delay_s": w.downscale_delay_s,
        },
        ray_actor_options={"num_cpus": cfg.worker_num_cpus, "num_gpus": gpus,
                           **({"resources": cfg.worker_resources} if cfg.worker_resources else {})},
        max_ongoing_requests=cfg.max_ongoing_per_worker,
        graceful_shutdown_timeout_s=cfg.drain_timeout_s + 10,
        request_router_config=RequestRouterConfig(
            request_router_class="lessserve.cluster.routing:SessionAffinityRouter",
            request_router_kwargs={"store": cfg.store.model_dump(mode="json")},
        ),
    )


def build_app(args: dict | None = None):
    """Serve import path target: `args` is a ServeConfig mapping; LESSSERVE_* env applies on top."""
    cfg = load_config(base=args)
    # Replicas get the config without the scaling block: changing worker counts or autoscaling
    # is then a lightweight update that keeps running workers and their sessions.
    cfg_dict = cfg.model_dump(mode="json", exclude={"workers"})
    worker = worker_deployment(cfg).bind(cfg_dict)
    return Router.options(num_replicas=cfg.router_replicas,
                          ray_actor_options={"num_cpus": cfg.router_num_cpus,
                                             **({"resources": cfg.router_resources} if cfg.router_resources else {})},
                          ).bind(worker, cfg_dict)
