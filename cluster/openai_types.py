"""OpenAI-compatible request/response bodies for /v1/chat/completions and /v1/models. The request
models are strict (FastAPI parses the body with them): a wrong JSON type is refused, never coerced
("0.5" is not a temperature)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lessserve.cluster.protocol import TokenLogprob
from lessserve.workers.session_ids import SESSION_ID_PATTERN

STRICT = ConfigDict(extra="forbid", strict=True)  # an unknown field is a 400 naming it; known ones never coerced


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str = Field(..., max_length=200_000)


class FunctionCall(BaseModel):
    model_config = STRICT

    name: str = Field(..., max_length=256)
    arguments: str = Field(..., max_length=200_000, description="JSON text")


class ToolCall(BaseModel):
    model_config = STRICT

    id: str = Field(..., max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


def call_text(call: ToolCall) -> str:
    """A tool call as the model wrote it under its grammar (cluster/structured.py): compact JSON,
    name first, so a conversation sent back extends the session's cache instead of diverging."""
    try:
        args = json.dumps(json.loads(call.function.arguments), separators=(",", ":"), ensure_ascii=False)
    except json.JSONDecodeError:
        args = json.dumps(call.function.arguments, ensure_ascii=False)
    return '{"name":' + json.dumps(call.function.name, ensure_ascii=False) + ',"arguments":' + args + "}"


class ChatMessage(BaseModel):
    """One message. `content` is a string or a list of text parts (joined); role `developer` is
    read as `system`; an assistant's tool_calls and a tool's result are rendered as text through
    the chat template. Non-text parts are refused with 400."""

    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, max_length=200_000)
    name: str | None = Field(None, max_length=256, description="a participant's name; not shown to the model")
    tool_calls: list[ToolCall] | None = Field(None, max_length=16, description="an assistant's calls")
    tool_call_id: str | None = Field(None, max_length=256, description="the call a tool message answers")
    refusal: str | None = Field(None, max_length=200_000, description="an assistant's refusal (as its text)")

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not self.tool_calls and self.refusal is None:
            raise ValueError("content: required (only an assistant message with tool_calls may omit it)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message has them")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        return self

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        if self.tool_calls:
            text += "".join(call_text(c) for c in self.tool_calls)
        if self.refusal and not text:
            text = self.refusal
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False
    include_obfuscation: Literal[False] | None = Field(None, description="no obfuscation padding is sent (true: 400)")


class JsonSchemaFormat(BaseModel):
    model_config = STRICT

    name: str = Field(..., max_length=64)
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = Field(None, description="the schema is always enforced, strict or not")
    description: str | None = Field(None, max_length=10_000)


class ResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("json_schema: a schema is required with type 'json_schema'")
        return self

    def as_dict(self) -> dict:
        out: dict = {"type": self.type}
        if self.json_schema is not None:
            out["json_schema"] = {"name": self.json_schema.name, "schema": self.json_schema.schema_}
        return out


class FunctionDef(BaseModel):
    model_config = STRICT

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=10_000)
    parameters: dict | None = None
    strict: bool | None = Field(None, description="arguments are always enforced by the schema")


class Tool(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = STRICT

    name: str = Field(..., max_length=64)


class NamedToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(BaseModel):
    """The body of POST /v1/chat/completions. Every OpenAI field is served or refused with a 400
    naming it (docs/serving.md has the table); an unknown field is a 400 too."""

    model_config = STRICT

    model: str = Field(..., max_length=256)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1000,
                                        description="the whole conversation; the last message is the user's")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most (legacy name)")
    max_completion_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="up to 4 strings; generation ends before the first")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, description="choice i samples with seed + i")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=16, description="choices: the prompt is prefilled once and forked")
    logprobs: bool | None = Field(None, description="each generated token's logprob")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token (needs logprobs)")
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="a turn makes at most one call either way")
    user: str | None = Field(None, max_length=256, description="an end-user id; no effect on the reply")
    safety_identifier: str | None = Field(None, max_length=256, description="an end-user id; no effect on the reply")
    metadata: dict[str, str] | None = Field(None, description="accepted with store false; nothing is stored")
    store: Literal[False] | None = Field(None, description="chat completions are not stored (true: 400)")
    service_tier: Literal["auto", "default"] | None = Field(None, description="one tier (others: 400)")
    modalities: list[Literal["text"]] | None = Field(None, description='only ["text"]')
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0, description="only 0 (others: 400)")
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0, description="only 0 (others: 400)")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="only empty (others: 400)")
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN,
                                   description="the conversation's id (the X-Session-Id header wins)")

    @field_validator("messages")
    @classmethod
    def _last_is_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v[-1].role not in ("user", "tool"):
            raise ValueError("the last message must have role 'user' (or 'tool', a call's result)")
        if not any(m.plain()["content"].strip() for m in v):
            raise ValueError("messages are empty")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or any(len(x) > 256 for x in stops)):
            raise ValueError("at most 4 stop strings of at most 256 characters")
        return stops

    @model_validator(mode="after")
    def _together(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: needs tools")
        if self.response_format is not None and self.response_format.type != "text" \
                and self.tool_choice not in (None, "none") and self.tools:
            raise ValueError("response_format: not with a forced tool call (the call's arguments follow its schema)")
        return self

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, OpenAI style. 503s carry a Retry-After header (seconds)."""

    error: ErrorDetail


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt: int, completion: int, prefilled: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": prompt - prefilled}}


def logprob_entry(lp: TokenLogprob) -> dict:
    text, value, raw, top = lp
    return {"token": text, "logprob": value, "bytes": list(raw),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}


def chat_logprobs(entries: list[TokenLogprob] | tuple[TokenLogprob, ...] | None) -> dict | None:
    return None if entries is None else {"content": [logprob_entry(e) for e in entries], "refusal": None}


def completion_body(cid: str, model: str, choices: list[dict], use: dict) -> dict:
    """choices: {"message": {...}, "finish_reason": ..., "logprobs": ...} in order."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, **c} for i, c in enumerate(choices)], "usage": use}


def chunk_body(cid: str, model: str, delta: dict, finish: str | None = None, use: dict | None = None,
               index: int = 0, logprobs: dict | None = None) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
    if use is not None:
        body["usage"] = use
    return body


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
