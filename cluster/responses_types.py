"""The OpenAI Responses API subset a chat server needs: the request body, the response object and
its streaming events. A response id names a point in a conversation (cluster/responses.py)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from lessserve.cluster.openai_types import STRICT, FunctionCall, FunctionDef, ToolCall, call_text
from lessserve.cluster.structured import plan

RESPONSE_ID_PATTERN = r"^resp_[0-9a-f]{24}$"


class InputText(BaseModel):
    model_config = STRICT

    type: Literal["input_text", "output_text", "text"]
    text: str = Field(..., max_length=200_000)


class InputMessage(BaseModel):
    """A message of `input` (`type` may be left out): `content` a string or text parts; non-text
    parts are refused."""

    model_config = STRICT

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText] = Field(..., max_length=1000)
    id: str | None = Field(None, max_length=256, description="an earlier output item's id")
    status: str | None = Field(None, max_length=32)

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class FunctionCallItem(BaseModel):
    """An earlier response's function call, sent back as input (rendered as the model wrote it)."""

    model_config = STRICT

    type: Literal["function_call"]
    call_id: str = Field(..., max_length=256)
    name: str = Field(..., max_length=64)
    arguments: str = Field(..., max_length=200_000)
    id: str | None = Field(None, max_length=256)
    status: str | None = Field(None, max_length=32)

    def plain(self) -> dict:
        return {"role": "assistant", "content": call_text(ToolCall(id=self.call_id, function=FunctionCall(
            name=self.name, arguments=self.arguments)))}


class FunctionCallOutput(BaseModel):
    """A function call's result, as input: a tool message."""

    model_config = STRICT

    type: Literal["function_call_output"]
    call_id: str = Field(..., max_length=256)
    output: str = Field(..., max_length=200_000)
    id: str | None = Field(None, max_length=256)
    status: str | None = Field(None, max_length=32)

    def plain(self) -> dict:
        return {"role": "tool", "content": self.output}


InputItem = InputMessage | FunctionCallItem | FunctionCallOutput


class TextFormat(BaseModel):
    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = Field(None, description="the schema is always enforced")
    description: str | None = Field(None, max_length=10_000)

    def as_dict(self) -> dict:
        return {"type": self.type, "json_schema": {"name": self.name, "schema": self.schema_}}


class TextConfig(BaseModel):
    model_config = STRICT

    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = Field(None, description="only the default")


class FunctionTool(FunctionDef):
    """A function tool in the Responses API's flat form: the chat API's function with its `type`."""

    type: Literal["function"]


class NamedFunctionChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    name: str = Field(..., max_length=64)


class ResponsesRequest(BaseModel):
    """The body of POST /v1/responses. Every OpenAI field is served or refused with a 400 naming it
    (docs/serving.md); an unknown field is a 400 too."""

    model_config = STRICT

    model: str = Field(..., max_length=256)
    input: str | list[InputItem] = Field(..., description="new input: a user message, or items")
    instructions: str | None = Field(None, max_length=200_000,
                                     description="a system message for this response (not carried to follow-ups)")
    previous_response_id: str | None = Field(None, pattern=RESPONSE_ID_PATTERN,
                                             description="continue (or fork) the conversation at that response")
    store: bool = Field(True, description="keep the response, so that it can be retrieved and continued")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(0.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    metadata: dict[str, str] | None = Field(None, description="up to 16 string pairs, returned as given")
    tools: list[FunctionTool] | None = Field(None, max_length=128, description="function tools (others: 400)")
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="a response makes at most one call either way")
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
        items = [InputMessage(role="user", content=v)] if isinstance(v, str) else v
        if not items:
            raise ValueError("the input is empty")
        last = items[-1]
        if not (isinstance(last, FunctionCallOutput) or (isinstance(last, InputMessage) and last.role == "user"
                                                         and last.plain()["content"].strip())):
            raise ValueError("the input must end with a non-empty user message or a function call's output")
        return items

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("at most 16 pairs, keys up to 64 and values up to 512 characters")
        return v

    def messages(self) -> list[dict]:
        return [m.plain() for m in self.input]

    def chat_tools(self) -> list[dict] | None:
        """The tools as chat templates take them (the chat API's nested form)."""
        return [{"type": "function", "function": t.model_dump(exclude={"type", "strict"}, exclude_none=True)}
                for t in self.tools] if self.tools else None

    def structured(self) -> tuple[str | None, str]:
        """(the grammar the reply follows, the tool mode: "forced", "auto" or "")."""
        functions = [t.model_dump(exclude={"type", "strict"}, exclude_none=True) for t in self.tools or []]
        choice = self.tool_choice
        named = choice.name if isinstance(choice, NamedFunctionChoice) else None
        fmt = self.text.format.as_dict() if self.text and self.text.format else None
        return plan(functions or None, None if named else choice, named, fmt, "text.format")


def response_id() -> str:
    return "resp_" + uuid.uuid4().hex[:24]


def output_items(rec: dict, done: bool) -> list[dict]:
    """The response's output: its message, or the function call a forced tool_choice made."""
    if not done:
        return []
    if rec.get("call"):
        c = rec["call"]
        return [{"id": "fc_" + rec["id"][5:], "type": "function_call", "status": "completed", "call_id": c["call_id"],
                 "name": c["name"], "arguments": c["arguments"]}]
    return [{"id": "msg_" + rec["id"][5:], "type": "message", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": rec.get("output_text", ""), "annotations": []}]}]


def response_object(rec: dict, status: str | None = None) -> dict:
    """The Responses API object of a record (cluster/responses.py keeps records): `completed`, or
    `incomplete` when max_output_tokens cut it; `in_progress` before its output exists (streaming)."""
    status = status or ("incomplete" if rec.get("finish") == "length" else "completed")
    done = status != "in_progress"
    return {
        "id": rec["id"], "object": "response", "created_at": rec["created_at"], "status": status,
        "model": rec["model"], "output": output_items(rec, done),
        "instructions": rec.get("instructions"), "previous_response_id": rec.get("previous_response_id"),
        "metadata": rec.get("metadata") or {}, "temperature": rec["temperature"], "top_p": rec["top_p"],
        "max_output_tokens": rec.get("max_output_tokens"), "store": rec["store"], "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "parallel_tool_calls": False, "tool_choice": rec.get("tool_choice") or "none", "tools": rec.get("tools") or [],
        "text": {"format": rec.get("format") or {"type": "text"}},
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

    def opening(self, calls: bool = False) -> list[str]:
        """`calls`: the output is a forced function call, sent whole by `closing`."""
        pending = response_object(self.rec, "in_progress")
        out = [self.event("response.created", response=pending), self.event("response.in_progress", response=pending)]
        if calls:
            return out
        item = {"id": self.item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        return [*out, self.event("response.output_item.added", output_index=0, item=item),
                self.event("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": []})]

    def delta(self, text: str) -> str:
        return self.event("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                          delta=text)

    def closing(self, rec: dict, calls: bool = False) -> list[str]:
        done = response_object(rec)
        item = done["output"][0]
        if item["type"] == "function_call":
            return [self.event("response.output_item.added", output_index=0, item={**item, "status": "in_progress"}),
                    self.event("response.function_call_arguments.done", item_id=item["id"], output_index=0,
                               arguments=item["arguments"]),
                    self.event("response.output_item.done", output_index=0, item=item),
                    self.event("response.completed", response=done)]
        if calls:  # a forced call that did not complete: its text, as a message
            return [self.event("response.output_item.added", output_index=0, item={**item, "status": "in_progress"}),
                    self.event("response.output_item.done", output_index=0, item=item),
                    self.event("response.completed", response=done)]
        part = item["content"][0]
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
