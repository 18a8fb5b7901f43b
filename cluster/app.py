"""The Ray Serve application: a stateless FastAPI router in front of session-affine workers.

`build_app(args)` is the import path for `serve run` / `serve deploy` / a RayService
(`lessserve.cluster.app:build_app`); `args` is a ServeConfig mapping.
"""


import json
import re
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from lessserve.cluster.auth import owner_of
from lessserve.cluster.config import ServeConfig, load_config
from lessserve.cluster.directory import make_directory
from lessserve.cluster.http_errors import ApiError, HttpError, http_error
from lessserve.cluster.openai_types import (
    SESSION_ID_PATTERN,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    usage,
)
from lessserve.cluster.state import get_state
from lessserve.cluster.worker import LessWorker
from lessserve.errors import LessServeError

app = FastAPI(title="lessserve", version="0.1.0",
              description="OpenAI-compatible multi-turn chat over LESS-compressed session caches")
_SID = re.compile(SESSION_ID_PATTERN)


class TokenTimer:
    """TTFT and inter-token gaps of one streamed turn, reported to the cluster's histograms."""

    def __init__(self, t0: float):
        self.t0, self.ttft, self.last, self.itls = t0, None, None, []

    def tick(self) -> None:
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.t0
        else:
            self.itls.append(now - self.last)
        self.last = now


def _err(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
         param: str | None = None, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _answer(h: HttpError) -> JSONResponse:
    return _err(h.status, h.message, h.type, h.code, h.param, h.retry_after)


@app.exception_handler(LessServeError)
async def _known_error(request: Request, e: LessServeError):
    return _answer(http_error(e))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    return _err(400, f"{'.'.join(map(str, first.get('loc', [])))}: {first.get('msg', 'invalid request')}")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    return _err(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error")


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception):
    known = http_error(e)  # a known error a worker raised, wrapped by Ray
    return _answer(known) if known else _err(500, f"internal error: {type(e).__name__}", "server_error")


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    return f"{loc}: {err['msg']}", loc or None


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    def __init__(self, worker, config: dict):
        self.cfg = ServeConfig.model_validate(config)
        self.worker = worker
        self.keys = self.cfg.keys()
        self.directory = make_directory(self.cfg.store.redis_url)
        self.state = get_state()

    # --- helpers ----------------------------------------------------------------------------
    def _owner(self, request: Request) -> str:
        return owner_of(request.headers.get("authorization"), self.keys)

    async def _check_session(self, sid: str, owner: str) -> dict | None:
        if not _SID.match(sid):
            raise ApiError(400, "session id must be 1-128 characters of A-Z a-z 0-9 . _ : -", param="session_id")
        entry = await self.directory.lookup(sid)
        if entry and entry.get("owner") not in (None, owner):
            raise ApiError(404, f"session {sid!r} not found", "not_found_error", "session_not_found")
        return entry

    async def _body(self, request: Request) -> dict:
        if int(request.headers.get("content-length") or 0) > self.cfg.max_body_bytes:
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
        return data

    # --- endpoints --------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        t0 = time.perf_counter()
        owner = self._owner(request)
        data = await self._body(request)
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise ApiError(400, msg, param=param) from None
        if req.model not in (self.cfg.model_name, self.cfg.engine.model):
            raise ApiError(404, f"model {req.model!r} does not exist; this server serves {self.cfg.model_name!r}",
                           "not_found_error", "model_not_found", "model")
        max_tokens = req.max_completion_tokens or req.max_tokens or self.cfg.default_max_tokens
        if max_tokens > self.cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit {self.cfg.max_tokens_limit}",
                           param="max_tokens")
        sid = request.headers.get("x-session-id") or req.session_id
        if sid:
            await self._check_session(sid, owner)
        handle = self.worker.options(stream=True, session_id=sid) if sid else self.worker.options(stream=True)
        messages = [m.model_dump() for m in req.messages]
        gen = handle.chat.remote(sid, owner, messages, max_tokens, req.temperature, req.top_p, req.seed)
        first = await gen.__anext__()
        if first["type"] == "error":
            raise HttpError.from_event(first).api_error()
        cid, model = completion_id(), self.cfg.model_name
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        if req.stream:
            return StreamingResponse(self._sse(gen, first, cid, model, include_usage, t0),
                                     media_type="text/event-stream")
        text, end, timer = [], {}, TokenTimer(t0)
        async for ev in gen:
            if ev["type"] == "token":
                timer.tick()
                text.append(ev["text"])
            elif ev["type"] == "end":
                end = ev
        use = usage(first["prompt_tokens"], end.get("completion_tokens", 0), first["prefilled"])
        self.state.record_request.remote(timer.ttft, timer.itls, use["completion_tokens"], first["prefilled"])
        return JSONResponse(completion_body(cid, model, "".join(text), end.get("finish_reason", "length"), use),
                            headers={"x-session-id": sid} if sid else None)

    async def _sse(self, gen, first: dict, cid: str, model: str, include_usage: bool, t0: float):
        send = lambda body: f"data: {json.dumps(body)}\n\n"  # noqa: E731
        yield send(chunk_body(cid, model, {"role": "assistant", "content": ""}))
        timer, end = TokenTimer(t0), {}
        try:
            async for ev in gen:
                if ev["type"] == "token":
                    timer.tick()
                    yield send(chunk_body(cid, model, {"content": ev["text"]}))
                elif ev["type"] == "end":
                    end = ev
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            h = http_error(e)
            yield send(error_body(f"generation failed: {h.message if h else type(e).__name__}",
                                  h.type if h else "server_error", code=h.code if h else None))
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

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._owner(request)
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "lessserve"}]}

    @app.get("/v1/sessions/{session_id}")
    async def session(self, session_id: str, request: Request):
        owner = self._owner(request)
        await self._check_session(session_id, owner)
        info = await self.worker.options(session_id=session_id).session_info.remote(session_id)
        if info is None:
            raise ApiError(404, f"session {session_id!r} not found", "not_found_error", "session_not_found")
        return info

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str, request: Request):
        owner = self._owner(request)
        entry = await self._check_session(session_id, owner)
        existed = await self.worker.options(session_id=session_id).delete_session.remote(session_id)
        if not existed and entry is None:
            raise ApiError(404, f"session {session_id!r} not found", "not_found_error", "session_not_found")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "model": self.cfg.model_name, "policy": self.cfg.engine.policy}

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
        ray_actor_options={"num_cpus": cfg.worker_num_cpus, "num_gpus": gpus},
        max_ongoing_requests=cfg.max_ongoing_per_worker,
        graceful_shutdown_timeout_s=cfg.drain_timeout_s + 10,
        request_router_config=RequestRouterConfig(
            request_router_class="lessserve.cluster.routing:SessionAffinityRouter",
            request_router_kwargs={"redis_url": cfg.store.redis_url},
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
                          ray_actor_options={"num_cpus": cfg.router_num_cpus}).bind(worker, cfg_dict)
