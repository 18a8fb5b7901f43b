"""POST /v1/chat/completions: the OpenAI chat API. The client resends the whole conversation;
`X-Session-Id` (or `session_id` in the body) names the session whose compressed cache stays on one
worker, so only the new suffix is prefilled. Without an id a request is a one-off."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lessserve.cluster.http_edge import Owner
from lessserve.cluster.http_errors import HttpError
from lessserve.cluster.openai_types import (
    ChatCompletionRequest,
    NamedToolChoice,
    chat_logprobs,
    chunk_body,
    completion_body,
    completion_id,
)
from lessserve.cluster.openapi import CHAT_EXTRA, ERRORS
from lessserve.cluster.protocol import TokenEvent, TurnRequest
from lessserve.cluster.streaming import (
    DONE,
    Choice,
    TurnOutcome,
    collect,
    open_turn,
    sse,
    sse_data,
    sse_error,
    turn_usage,
)
from lessserve.cluster.structured import call_id, plan, tool_calls

if TYPE_CHECKING:
    from lessserve.cluster.router import RouterContext

class ChatFrames:
    """chat.completion.chunk events: the role, one delta per token (with its logprobs when asked
    for), each choice's finish reason, the usage when asked for, then `data: [DONE]`. A forced tool
    call is sent as one tool_calls delta when its choice ends."""

    def __init__(self, cid: str, model: str, include_usage: bool, n: int, logprobs: bool, mode: str):
        """mode: the tool mode (cluster/structured.py): with one, the reply is sent whole at its end."""
        self.cid, self.model, self.include_usage = cid, model, include_usage
        self.n, self.logprobs, self.mode, self.calls = n, logprobs, mode, bool(mode)

    def opening(self) -> list[str]:
        return [sse_data(chunk_body(self.cid, self.model, {"role": "assistant", "content": ""}, index=i))
                for i in range(self.n)]

    def delta(self, ev: TokenEvent) -> str:
        if self.calls or not (ev.text or ev.logprobs):
            return ""
        lps = chat_logprobs(ev.logprobs) if self.logprobs else None
        return sse_data(chunk_body(self.cid, self.model, {"content": ev.text}, index=ev.index, logprobs=lps))

    async def closing(self, turn: TurnOutcome) -> list[str]:
        out = []
        for i, c in enumerate(turn.ordered()):
            msg, finish = choice_message(c, self.mode)
            if msg.get("tool_calls"):
                calls = [{"index": 0, **call} for call in msg["tool_calls"]]
                out.append(sse_data(chunk_body(self.cid, self.model, {"tool_calls": calls}, index=i)))
            elif self.calls:
                out.append(sse_data(chunk_body(self.cid, self.model, {"content": msg["content"]}, index=i)))
            out.append(sse_data(chunk_body(self.cid, self.model, {}, finish, index=i)))
        if self.include_usage:
            body = chunk_body(self.cid, self.model, {}, use=turn_usage(turn))
            body["choices"] = []
            out.append(sse_data(body))
        return [*out, DONE]

    def error(self, h: HttpError | None, e: BaseException) -> list[str]:
        return sse_error(h, e)

    async def aborted(self) -> None:
        """Nothing to undo: a chat turn cut short keeps what its cache consumed (the worker closes
        the turn with exactly those tokens)."""


def choice_message(c: Choice, mode: str) -> tuple[dict, str]:
    """A choice's assistant message and finish reason: a forced call that completed, or the calls
    the worker parsed from the model's own reply (mode "auto"), are tool_calls."""
    if mode == "auto" and c.end is not None and c.end.tool_calls:
        calls = [{"id": call_id(), "type": "function", "function": {"name": n, "arguments": a}}
                 for n, a in c.end.tool_calls]
        return {"role": "assistant", "content": c.end.content or None, "tool_calls": calls}, "tool_calls"
    if mode == "forced" and c.finish_reason == "stop" and (parsed := tool_calls(c.text)):
        return {"role": "assistant", "content": None, "tool_calls": parsed}, "tool_calls"
    return {"role": "assistant", "content": c.text}, c.finish_reason


def chat_routes(ctx: RouterContext) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/chat/completions", responses=ERRORS, openapi_extra=CHAT_EXTRA,
              summary="Chat completion (OpenAI-compatible); X-Session-Id keeps the conversation's cache")
    async def chat_completions(body: ChatCompletionRequest, request: Request, owner: Owner):
        t0 = time.perf_counter()
        max_tokens = body.max_completion_tokens or body.max_tokens or ctx.cfg.default_max_tokens
        ctx.check_request(body.model, max_tokens, "max_tokens", body.n or 1)
        grammar, mode = await asyncio.to_thread(structured, body)  # a large schema: off the loop
        client_sid = request.headers.get("x-session-id") or body.session_id
        sid = ctx.scope(client_sid, owner) if client_sid else None  # each API key has its own session ids
        if sid and await ctx.check_session(sid, owner) is None:  # a new session (or the directory is down)
            await ctx.quotas.new_session(owner)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        req = TurnRequest(session_id=sid, owner=owner, messages=[m.plain() for m in body.messages],
                          max_tokens=max_tokens, temperature=body.temperature or 0.0,
                          top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=body.stop_list(),
                          n=body.n or 1, logprobs=body.logprobs_k(), grammar=grammar, tools=tools,
                          auto_tools=mode == "auto")
        turn, events = await open_turn(ctx.deps.backend, req, stream=bool(body.stream), t0=t0,
                                       guard=ctx.quotas.guard)
        cid, model = completion_id(), ctx.cfg.model_name
        if body.stream:
            frames = ChatFrames(cid, model, bool(body.stream_options and body.stream_options.include_usage),
                                req.n, body.logprobs_k() is not None, mode)
            return StreamingResponse(sse(turn, events, frames, ctx.deps.metrics, cid), media_type="text/event-stream")
        await collect(turn, events)
        turn.record(ctx.deps.metrics)
        choices = []
        for c in turn.ordered():
            msg, finish = choice_message(c, mode)
            choices.append({"message": msg, "finish_reason": finish,
                            "logprobs": chat_logprobs(c.logprobs) if req.logprobs is not None else None})
        return JSONResponse(completion_body(cid, model, choices, turn_usage(turn)),
                            headers={"x-session-id": client_sid} if client_sid else None)

    return api


def structured(body: ChatCompletionRequest) -> tuple[str | None, str]:
    """(the grammar the reply follows, the tool mode: "forced", "auto" or "")."""
    functions = [t.function.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = body.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    fmt = body.response_format.as_dict() if body.response_format else None
    return plan(functions, None if named else choice, named, fmt, "response_format")
