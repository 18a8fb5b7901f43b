"""OpenAI-compatible request/response bodies for /v1/chat/completions and /v1/models. The request
models are strict (FastAPI parses the body with them): a wrong JSON type is refused, never coerced
("0.5" is not a temperature)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lessserve.workers.session_ids import SESSION_ID_PATTERN

STRICT = ConfigDict(extra="ignore", strict=True)  # unknown OpenAI fields ignored, known ones never coerced


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str = Field(..., max_length=200_000)


class ChatMessage(BaseModel):
    """One message. `content` is a string or a list of text parts (joined); role `developer` is
    read as `system`. Other roles (tool, function) and non-text parts are refused with 400."""

    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(..., max_length=200_000)
    name: str | None = Field(None, max_length=256, description="accepted and ignored")

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of POST /v1/chat/completions. OpenAI fields this server does not use are accepted
    and ignored; a field of the wrong type, or out of range, is a 400 naming it."""

    model_config = STRICT

    model: str = Field(..., max_length=256)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1000,
                                        description="the whole conversation; the last message is the user's")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most (legacy name)")
    max_completion_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="up to 4 strings; generation ends before the first")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, description="choices; only 1 is supported (more: 400)")
    tools: list | None = Field(None, description="not supported: a non-empty list is refused with 400")
    logprobs: bool | None = Field(None, description="not supported: true is refused with 400")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="not supported: refused with 400")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN,
                                   description="the conversation's id (the X-Session-Id header wins)")

    @field_validator("messages")
    @classmethod
    def _last_is_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
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
    def _unsupported(self):
        """Fields a client relies on that this server cannot honour: a clear 400, never silently ignored."""
        if self.n > 1:
            raise ValueError("n: only n = 1 is supported (send n requests, or fork a response with /v1/responses)")
        if self.tools:
            raise ValueError("tools: tool calling is not supported by this server")
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs: log probabilities are not supported by this server")
        return self

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


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


def completion_body(cid: str, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}], "usage": use}


def chunk_body(cid: str, model: str, delta: dict, finish: str | None = None, use: dict | None = None) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if use is not None:
        body["usage"] = use
    return body


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
