"""POST/GET/DELETE /v1/responses: the OpenAI Responses API. A request sends only its new input;
`previous_response_id` names a point in a conversation. Each response owns one session (a response
session, cluster/protocol.py) whose compressed cache is the conversation right after it; a
follow-up runs on the worker that holds its parent and forks it (one slot copied), so two
follow-ups to one response are two branches. Records: cluster/responses.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse, StreamingResponse

from lessserve.cluster.http_edge import Owner
from lessserve.cluster.http_errors import HttpError
from lessserve.cluster.openapi import ERRORS, RESPONSES_EXTRA
from lessserve.cluster.protocol import TokenEvent, TurnRequest, response_session
from lessserve.cluster.responses import SNAPSHOT_EVERY
from lessserve.cluster.responses_types import (
    RESPONSE_ID_PATTERN,
    EventStream,
    ResponsesRequest,
    now,
    response_id,
    response_object,
    response_usage,
)
from lessserve.cluster.streaming import TurnOutcome, collect, open_turn, sse
from lessserve.cluster.structured import call_id, parsed_call

if TYPE_CHECKING:
    from lessserve.cluster.router import RouterContext

RESPONSE_PATH = Path(..., pattern=RESPONSE_ID_PATTERN, description="a response's id (resp_...)")
LOOKUP_ERRORS = {k: ERRORS[k] for k in (401, 404, 503)}


class ResponseFrames:
    """Responses API events, numbered: response.created ... one output_text.delta per token ...
    response.completed once the record is kept."""

    def __init__(self, ctx: RouterContext, rec: dict, mode: str):
        self.ctx, self.rec, self.events, self.mode, self.calls = ctx, rec, EventStream(rec), mode, bool(mode)

    def opening(self) -> list[str]:
        return self.events.opening(self.calls)

    def delta(self, ev: TokenEvent) -> str:
        return "" if self.calls or not ev.text else self.events.delta(ev.text)

    async def closing(self, turn: TurnOutcome) -> list[str]:
        await finish(self.ctx, self.rec, turn, self.mode)
        return self.events.closing(self.rec, self.calls)

    def error(self, h: HttpError | None, e: BaseException) -> list[str]:
        return [self.events.error(h.code if h else "stream_interrupted", h.message if h else type(e).__name__)]

    async def aborted(self) -> None:
        await forget_unstored(self.ctx, self.rec)


async def forget_unstored(ctx: RouterContext, rec: dict) -> None:
    """A response that ended before its record was stored names a session nobody can reach: forget
    it now rather than leave it to expire (best effort; its TTLs collect it otherwise)."""
    if rec["store"] and not rec.get("stored"):
        with contextlib.suppress(Exception):
            await ctx.deps.backend.delete_session(rec["session"], rec["owner"])


async def finish(ctx: RouterContext, rec: dict, turn: TurnOutcome, mode: str) -> None:
    """The record completed with the turn's output (a call, forced or the model's own, parsed),
    kept unless `store` is false."""
    rec.update(output_text=turn.text, finish=turn.finish_reason,
               usage=response_usage(turn.start.prompt_tokens, turn.completion_tokens, turn.start.prefilled))
    end = turn.choice(0).end
    call = end.tool_calls[0] if mode == "auto" and end is not None and end.tool_calls else \
        parsed_call(turn.text) if mode == "forced" and turn.finish_reason == "stop" else None
    if call:
        rec["call"] = {"call_id": call_id(), "name": call[0], "arguments": call[1]}
        rec["finish"] = "stop"
    reply = {"role": "assistant", "content": turn.text}
    rec["turn"] = [*rec["turn"], reply]
    if "messages" in rec:  # a snapshot: the whole history up to this response
        rec["messages"] = [*rec["messages"], reply]
    if rec["store"]:
        await ctx.deps.responses.put(rec)
        rec["stored"] = True


def responses_routes(ctx: RouterContext) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/responses", responses=ERRORS, openapi_extra=RESPONSES_EXTRA,
              summary="Create a response (OpenAI Responses API); previous_response_id continues or forks")
    async def responses_create(body: ResponsesRequest, owner: Owner):
        t0 = time.perf_counter()
        max_tokens = body.max_output_tokens or ctx.cfg.default_max_tokens
        ctx.check_request(body.model, max_tokens, "max_output_tokens")
        history, parent, depth = [], None, 0
        if body.previous_response_id:
            history, prev = await ctx.deps.responses.history(body.previous_response_id, owner)
            parent, depth = prev["session"], prev.get("depth", 0) + 1
        new = body.messages()
        grammar, mode = await asyncio.to_thread(body.structured)  # a large schema: off the loop
        if body.store:  # the record's size is known once the reply is: its input counts now
            await ctx.quotas.new_response(owner, nbytes=sum(len(m["content"].encode()) for m in new))
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        rid = response_id()
        sid = response_session(rid)  # one session per response: its cache is the conversation at that point
        rec = {"id": rid, "owner": owner, "session": sid, "created_at": now(), "model": ctx.cfg.model_name,
               "turn": new, "depth": depth, "previous_response_id": body.previous_response_id,
               "instructions": body.instructions, "metadata": body.metadata, "temperature": body.temperature,
               "top_p": body.top_p, "max_output_tokens": body.max_output_tokens, "store": body.store,
               "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
               "tool_choice": body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump")
               else body.tool_choice, "format": body.text.format.model_dump(by_alias=True, exclude_none=True)
               if body.text and body.text.format else None}
        if depth % SNAPSHOT_EVERY == 0:
            rec["messages"] = [*history, *new]
        req = TurnRequest(session_id=sid, owner=owner, messages=[*system, *history, *new], max_tokens=max_tokens,
                          temperature=body.temperature or 0.0, top_p=1.0 if body.top_p is None else body.top_p,
                          fork_from=parent, ephemeral=not body.store, grammar=grammar,
                          tools=body.chat_tools(), auto_tools=mode == "auto")
        turn, events = await open_turn(ctx.deps.backend, req, stream=body.stream, t0=t0, guard=ctx.quotas.guard)
        if body.stream:
            return StreamingResponse(sse(turn, events, ResponseFrames(ctx, rec, mode), ctx.deps.metrics, rid),
                                     media_type="text/event-stream")
        try:
            await collect(turn, events)
            await finish(ctx, rec, turn, mode)
        finally:
            await asyncio.shield(forget_unstored(ctx, rec))  # no-op once stored
        turn.record(ctx.deps.metrics)
        return JSONResponse(response_object(rec))

    @api.get("/v1/responses/{response_id}", responses=LOOKUP_ERRORS)
    async def responses_get(owner: Owner, response_id: str = RESPONSE_PATH):
        return response_object(await ctx.deps.responses.get(response_id, owner))

    @api.delete("/v1/responses/{response_id}", responses=LOOKUP_ERRORS)
    async def responses_delete(owner: Owner, response_id: str = RESPONSE_PATH):
        rec = await ctx.deps.responses.delete(response_id, owner)
        with contextlib.suppress(Exception):  # the record is gone; its cache expires with the tiers if this fails
            await ctx.deps.backend.delete_session(rec["session"], owner)
        return {"id": response_id, "object": "response", "deleted": True}

    return api
