"""The OpenAI Responses API subset a chat server needs: the request body, the response object and
its streaming events. A response id names a point in a conversation (cluster/responses.py)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from lessserve.cluster.openai_types import STRICT

RESPONSE_ID_PATTERN = r"^resp_[0-9a-f]{24}$"


class InputText(BaseModel):
    model_config = STRICT

    type: Literal["input_text", "output_text", "text"]
    text: str = Field(..., max_length=200_000)


class InputMessage(BaseModel):
    """A message of `input`: `content` a string or text parts; non-text parts are refused."""

    model_config = STRICT

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText] = Field(..., max_length=1000)

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class TextFormat(BaseModel):
    model_config = STRICT

    type: Literal["text"] = Field(..., description="only plain text on /v1/responses for now (json_schema: 400)")


class TextConfig(BaseModel):
    model_config = STRICT

    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = Field(None, description="only the default")


class ResponsesRequest(BaseModel):
    """The body of POST /v1/responses. Every OpenAI field is served or refused with a 400 naming it
    (docs/serving.md); an unknown field is a 400 too."""

    model_config = STRICT

    model: str = Field(..., max_length=256)
    input: str | list[InputMessage] = Field(..., description="new input: a user message, or messages")
    instructions: str | None = Field(None, max_length=200_000,
                                     description="a system message for this response (not carried to follow-ups)")
    previous_response_id: str | None = Field(None, pattern=RESPONSE_ID_PATTERN,
                                             description="continue (or fork) the conversation at that response")
    store: bool = Field(True, description="keep the response, so that it can be retrieved and continued")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    metadata: dict[str, str] | None = Field(None, description="up to 16 string pairs, returned as given")
    tools: list | None = Field(None, description="not supported yet: a non-empty list is refused")
    tool_choice: Literal["none"] | None = Field(None, description="only 'none' (tools are not supported yet)")
    parallel_tool_calls: bool | None = Field(None, description="no tool calls are made either way")
    include: list[str] | None = Field(None, max_length=0, description="only empty: no extra output is included")
    truncation: Literal["auto", "disabled"] | None = Field(
        None, description="a conversation is never truncated: its history is compressed into the session")
    text: TextConfig | None = None
    user: str | None = Field(None, max_length=256, description="an end-user id; no effect on the reply")
    safety_identifier: str | None = Field(None, max_length=256, description="an end-user id; no effect")
    service_tier: Literal["auto", "default"] | None = Field(None, description="one tier (others: 400)")

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        msgs = [InputMessage(role="user", content=v)] if isinstance(v, str) else v
        if not msgs or msgs[-1].role != "user" or not msgs[-1].plain()["content"].strip():
            raise ValueError("the input must end with a non-empty user message")
        return msgs

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("at most 16 pairs, keys up to 64 and values up to 512 characters")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        if v:
            raise ValueError("tool calling is not supported by this server")
        return v

    def messages(self) -> list[dict]:
        return [m.plain() for m in self.input]


def response_id() -> str:
    return "resp_" + uuid.uuid4().hex[:24]


def response_object(rec: dict, status: str | None = None) -> dict:
    """The Responses API object of a record (cluster/responses.py keeps records): `completed`, or
    `incomplete` when max_output_tokens cut it; `in_progress` before its output exists (streaming)."""
    status = status or ("incomplete" if rec.get("finish") == "length" else "completed")
    done = status != "in_progress"
    item = {"id": "msg_" + rec["id"][5:], "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": rec.get("output_text", ""), "annotations": []}]}
    return {
        "id": rec["id"], "object": "response", "created_at": rec["created_at"], "status": status,
        "model": rec["model"], "output": [item] if done else [],
        "instructions": rec.get("instructions"), "previous_response_id": rec.get("previous_response_id"),
        "metadata": rec.get("metadata") or {}, "temperature": rec["temperature"], "top_p": rec["top_p"],
        "max_output_tokens": rec.get("max_output_tokens"), "store": rec["store"], "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "text": {"format": {"type": "text"}},
        "truncation": "disabled", "usage": rec.get("usage") if done else None,
    }


def response_usage(prompt: int, completion: int, prefilled: int) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": prompt - prefilled},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


class EventStream:
    """Server-sent events in the Responses format, numbered."""

    def __init__(self, rec: dict):
        self.rec, self.n, self.item_id = rec, 0, "msg_" + rec["id"][5:]

    def event(self, type_: str, **fields) -> str:
        import json

        body = {"type": type_, "sequence_number": self.n, **fields}
        self.n += 1
        return f"event: {type_}\ndata: {json.dumps(body)}\n\n"

    def opening(self) -> list[str]:
        pending = response_object(self.rec, "in_progress")
        item = {"id": self.item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        return [self.event("response.created", response=pending), self.event("response.in_progress", response=pending),
                self.event("response.output_item.added", output_index=0, item=item),
                self.event("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": []})]

    def delta(self, text: str) -> str:
        return self.event("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                          delta=text)

    def closing(self, rec: dict) -> list[str]:
        done = response_object(rec)
        part = done["output"][0]["content"][0]
        return [self.event("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                           text=part["text"]),
                self.event("response.content_part.done", item_id=self.item_id, output_index=0, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=0, item=done["output"][0]),
                self.event("response.completed", response=done)]

    def error(self, code: str | None, message: str) -> str:
        return self.event("error", code=code, message=message, param=None)


def now() -> int:
    return int(time.time())
