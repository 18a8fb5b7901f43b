"""POST /v1/completions: the legacy OpenAI completions API, as evaluation harnesses use it
(lm-evaluation-harness's `local-completions`): a raw prompt (text or token ids, no chat template),
one-off, `echo` to get the prompt back with its logprobs computed by the (compressed) prefill,
`max_tokens: 0` for the prompt alone. Each prompt of a batch is its own turn; choice
`i * n + j` is prompt i's choice j."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, model_validator

from lessserve.cluster.http_edge import Owner
from lessserve.cluster.http_errors import HttpError
from lessserve.cluster.openai_types import STRICT, StreamOptions, usage
from lessserve.cluster.openapi import ERRORS
from lessserve.cluster.protocol import TokenEvent, TokenLogprob, TurnRequest
from lessserve.cluster.streaming import DONE, TurnOutcome, collect, open_turn, sse, sse_data, sse_error, turn_usage

if TYPE_CHECKING:
    from lessserve.cluster.router import RouterContext

MAX_PROMPTS = 64


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions; every OpenAI field served or refused by name."""

    model_config = STRICT

    model: str = Field(..., max_length=256)
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="text, texts, token ids, or lists of token ids (one turn each)")
    max_tokens: int | None = Field(16, ge=0, description="0: only the prompt (with echo and logprobs)")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=16, description="choices per prompt, prefilled once and forked")
    best_of: int | None = Field(None, ge=1, description="only equal to n (ranking choices is not supported)")
    logprobs: int | None = Field(None, ge=0, le=20, description="each token's logprob and this many alternatives")
    echo: bool | None = Field(False, description="the prompt comes back before the completion (and its logprobs)")
    stop: str | list[str] | None = Field(None, description="up to 4 strings")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = Field(None, max_length=0, description="insertion is not supported (a non-empty suffix: 400)")
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0, description="only 0")
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0, description="only 0")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="only empty")
    user: str | None = Field(None, max_length=256, description="an end-user id; no effect on the reply")

    @model_validator(mode="after")
    def _check(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of: only best_of equal to n is supported")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is not None and (len(stops) > 4 or any(len(x) > 256 for x in stops)):
            raise ValueError("stop: at most 4 stop strings of at most 256 characters")
        if not self.prompts() or len(self.prompts()) > MAX_PROMPTS:
            raise ValueError(f"prompt: 1 to {MAX_PROMPTS} prompts")
        if any(len(p) == 0 for p in self.prompts()):
            raise ValueError("prompt: a prompt is empty")
        if self.stream and len(self.prompts()) > 1:
            raise ValueError("stream: one prompt per streamed request")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def completion_logprobs(entries: list[TokenLogprob], start: int = 0) -> dict:
    """OpenAI's legacy logprobs: parallel lists; a token without a logprob (the prompt's first, or
    an echoed prompt whose logprobs were not asked for) has null entries."""
    tokens, values, tops, offsets, at = [], [], [], [], start
    for text, value, _, top in entries:
        tokens.append(text)
        values.append(value)
        tops.append(None if value is None else dict(top))
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def choice_body(turn: TurnOutcome, j: int, index: int, echo: bool, logprobs: bool) -> dict:
    c = turn.choice(j)
    prompt = turn.prompt
    text = (prompt.text if echo and prompt else "") + c.text
    lps = None
    if logprobs:
        entries: list = []
        if echo and prompt is not None:
            given = prompt.logprobs or (None,) * len(prompt.tokens)
            entries = [e if e is not None else (t, None, (), ()) for t, e in zip(prompt.tokens, given, strict=True)]
        lps = completion_logprobs([*entries, *c.logprobs])
    return {"index": index, "text": text, "logprobs": lps, "finish_reason": c.finish_reason}


class CompletionFrames:
    def __init__(self, cid: str, model: str, echo: bool, logprobs: bool, include_usage: bool):
        self.cid, self.model, self.echo, self.logprobs, self.include_usage = cid, model, echo, logprobs, include_usage
        self.sent = 0

    def chunk(self, choices: list[dict], use: dict | None = None) -> str:
        body = {"id": self.cid, "object": "text_completion", "created": int(time.time()), "model": self.model,
                "choices": choices}
        if use is not None:
            body["usage"] = use
        return sse_data(body)

    def opening(self) -> list[str]:
        return []

    def delta(self, ev: TokenEvent) -> str:
        lps = completion_logprobs(list(ev.logprobs)) if self.logprobs else None
        return self.chunk([{"index": ev.index, "text": ev.text, "logprobs": lps, "finish_reason": None}])

    async def closing(self, turn: TurnOutcome) -> list[str]:
        out = [self.chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": c.finish_reason}])
               for i, c in enumerate(turn.ordered())]
        if self.include_usage:
            out.append(self.chunk([], use=turn_usage(turn)))
        return [*out, DONE]

    def error(self, h: HttpError | None, e: BaseException) -> list[str]:
        return sse_error(h, e)

    async def aborted(self) -> None:
        """Nothing to undo: a completion is a one-off."""


def completions_routes(ctx: RouterContext) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/completions", responses=ERRORS,
              summary="Text completion (OpenAI legacy API): raw prompts, echo and prompt logprobs")
    async def completions(body: CompletionRequest, owner: Owner):
        t0 = time.perf_counter()
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        ctx.check_request(body.model, max_tokens, "max_tokens", body.n or 1)
        n, k = body.n or 1, body.logprobs

        def request(prompt) -> TurnRequest:
            return TurnRequest(owner=owner, prompt=prompt, max_tokens=max_tokens,
                               temperature=1.0 if body.temperature is None else body.temperature,
                               top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                               stop=body.stop_list(), n=n, logprobs=k, echo=bool(body.echo),
                               prompt_logprobs=k if body.echo else None)

        cid, model = "cmpl-" + uuid.uuid4().hex[:24], ctx.cfg.model_name
        if body.stream:
            turn, events = await open_turn(ctx.deps.backend, request(body.prompts()[0]), stream=True, t0=t0,
                                           guard=ctx.quotas.guard)
            frames = CompletionFrames(cid, model, bool(body.echo), k is not None,
                                      bool(body.stream_options and body.stream_options.include_usage))
            return StreamingResponse(sse(turn, events, frames, ctx.deps.metrics, cid), media_type="text/event-stream")

        async def one(prompt) -> TurnOutcome:
            turn, events = await open_turn(ctx.deps.backend, request(prompt), stream=False, t0=t0,
                                           guard=ctx.quotas.guard)
            await collect(turn, events)
            turn.record(ctx.deps.metrics)
            return turn

        turns = await asyncio.gather(*(one(p) for p in body.prompts()))
        choices = [choice_body(t, j, i * n + j, bool(body.echo), k is not None)
                   for i, t in enumerate(turns) for j in range(n)]
        use = usage(sum(t.start.prompt_tokens for t in turns), sum(t.completion_tokens for t in turns),
                    sum(t.start.prefilled for t in turns))
        return JSONResponse({"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
                             "choices": choices, "usage": use})

    return api
