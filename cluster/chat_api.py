"""POST /v1/chat/completions: the OpenAI chat API. The client resends the whole conversation;
`X-Session-Id` (or `session_id` in the body) names the session whose compressed cache stays on one
worker, so only the new suffix is prefilled. Without an id a request is a one-off."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lessserve.cluster.http_edge import Owner
from lessserve.cluster.http_errors import HttpError
from lessserve.cluster.openai_types import (
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    usage,
)
from lessserve.cluster.openapi import CHAT_EXTRA, ERRORS
from lessserve.cluster.protocol import TurnRequest
from lessserve.cluster.streaming import TurnOutcome, collect, open_turn, sse, sse_data

if TYPE_CHECKING:
    from lessserve.cluster.router import RouterContext

DONE = "data: [DONE]\n\n"


class ChatFrames:
    """chat.completion.chunk events: the role, one delta per token, the finish reason, the usage
    when asked for, then `data: [DONE]`."""

    def __init__(self, cid: str, model: str, include_usage: bool):
        self.cid, self.model, self.include_usage = cid, model, include_usage

    def opening(self) -> list[str]:
        return [sse_data(chunk_body(self.cid, self.model, {"role": "assistant", "content": ""}))]

    def delta(self, text: str) -> str:
        return sse_data(chunk_body(self.cid, self.model, {"content": text}))

    async def closing(self, turn: TurnOutcome) -> list[str]:
        out = [sse_data(chunk_body(self.cid, self.model, {}, turn.finish_reason))]
        if self.include_usage:
            body = chunk_body(self.cid, self.model, {}, use=turn_usage(turn))
            body["choices"] = []
            out.append(sse_data(body))
        return [*out, DONE]

    def error(self, h: HttpError | None, e: BaseException) -> list[str]:
        return [sse_data(error_body(f"generation failed: {h.message if h else type(e).__name__}",
                                    h.type if h else "server_error", code=h.code if h else "stream_interrupted")),
                DONE]

    async def aborted(self) -> None:
        """Nothing to undo: a chat turn cut short keeps what its cache consumed (the worker closes
        the turn with exactly those tokens)."""


def turn_usage(turn: TurnOutcome) -> dict:
    return usage(turn.start.prompt_tokens, turn.completion_tokens, turn.start.prefilled)


def chat_routes(ctx: RouterContext) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/chat/completions", responses=ERRORS, openapi_extra=CHAT_EXTRA,
              summary="Chat completion (OpenAI-compatible); X-Session-Id keeps the conversation's cache")
    async def chat_completions(body: ChatCompletionRequest, request: Request, owner: Owner):
        t0 = time.perf_counter()
        max_tokens = body.max_completion_tokens or body.max_tokens or ctx.cfg.default_max_tokens
        ctx.check_request(body.model, max_tokens, "max_tokens")
        client_sid = request.headers.get("x-session-id") or body.session_id
        sid = ctx.scope(client_sid, owner) if client_sid else None  # each API key has its own session ids
        if sid and await ctx.check_session(sid, owner) is None:  # a new session (or the directory is down)
            await ctx.quotas.new_session(owner)
        req = TurnRequest(session_id=sid, owner=owner, messages=[m.plain() for m in body.messages],
                          max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                          stop=body.stop_list())
        turn, events = await open_turn(ctx.deps.backend, req, stream=body.stream, t0=t0, guard=ctx.quotas.guard)
        cid, model = completion_id(), ctx.cfg.model_name
        if body.stream:
            frames = ChatFrames(cid, model, bool(body.stream_options and body.stream_options.include_usage))
            return StreamingResponse(sse(turn, events, frames, ctx.deps.metrics, cid), media_type="text/event-stream")
        await collect(turn, events)
        turn.record(ctx.deps.metrics)
        return JSONResponse(completion_body(cid, model, turn.text, turn.finish_reason, turn_usage(turn)),
                            headers={"x-session-id": client_sid} if client_sid else None)

    return api
