"""Structured outputs at the router: `response_format` and forced tool calls become the grammar a
worker enforces (workers/constraints.py), and a forced call's JSON becomes the client's tool_calls.

    response_format {"type": "json_object"}                 any JSON object
    response_format {"type": "json_schema", "json_schema"}  that schema (strict or not: always enforced)
    tool_choice "required" / {"type": "function", ...}      {"name": <one of the tools>, "arguments": <its parameters>}

`tool_choice: "auto"` (OpenAI's default when tools are sent): the tools are rendered by the chat
template and the model's own calls parsed from its reply (workers/tool_parsers.py); a model whose
template renders no tools, or whose call syntax has no parser here, gets a 400 naming tool_choice
from the worker. With "none" no call is made."""

from __future__ import annotations

import json
import uuid
from typing import Any

from lessserve.workers.constraints import ANY_JSON_OBJECT, GrammarError, json_schema_grammar


def response_format_grammar(fmt: dict | None) -> str | None:
    """The grammar of a response_format (None: free text)."""
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt["type"] == "json_object":
        return json_schema_grammar(json.loads(ANY_JSON_OBJECT))
    schema = (fmt.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        raise GrammarError("response_format.json_schema.schema: a JSON schema object is required")
    return json_schema_grammar(schema)


def tool_call_schema(functions: list[dict], name: str | None) -> dict[str, Any]:
    """One call of a named function (or of any): {"name": ..., "arguments": {...}}."""
    chosen = [f for f in functions if name is None or f["name"] == name]
    if not chosen:
        raise GrammarError(f"tool_choice names {name!r}, which is not among the tools")

    def one(f: dict) -> dict:
        params = f.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                "required": ["name", "arguments"], "additionalProperties": False}

    return one(chosen[0]) if len(chosen) == 1 else {"anyOf": [one(f) for f in chosen]}


def tool_grammar(functions: list[dict] | None, choice: str | None, named: str | None = None) -> tuple[str | None, str]:
    """functions: {"name", "parameters", ...}; choice: "none" / "auto" / "required" / None, or
    `named` (a function's name) -> (the grammar of a forced call or None, the mode: "forced",
    "auto" (the model may call; its reply is parsed) or "" (no call))."""
    if not functions or (choice == "none" and named is None):
        return None, ""
    if choice in (None, "auto") and named is None:  # OpenAI's default with tools is "auto"
        return None, "auto"
    return json_schema_grammar(tool_call_schema(functions, named)), "forced"


def plan(functions: list[dict] | None, choice: str | None, named: str | None, fmt: dict | None,
         fmt_field: str) -> tuple[str | None, str]:
    """(the grammar the reply follows, the tool mode of tool_grammar); what cannot be enforced is a
    400 naming its field (`fmt_field`: where the API keeps its response format)."""
    from lessserve.cluster.http_errors import ApiError

    try:
        grammar, mode = tool_grammar(functions, choice, named)
    except GrammarError as e:
        raise ApiError(400, f"{'tool_choice' if 'tool_choice' in str(e) else 'tools'}: {e}",
                       param="tool_choice" if "tool_choice" in str(e) else "tools") from None
    if mode == "forced":
        return grammar, mode
    try:
        return response_format_grammar(fmt), mode
    except GrammarError as e:
        raise ApiError(400, f"{fmt_field}: {e}", param=fmt_field) from None


def parsed_call(text: str) -> tuple[str, str] | None:
    """A forced call's text (grammar-valid JSON) -> (name, arguments as compact JSON); None if it
    did not complete."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    return call["name"], json.dumps(call["arguments"], separators=(",", ":"), ensure_ascii=False)


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_calls(text: str) -> list[dict]:
    """A forced call's text -> OpenAI chat tool_calls; [] if it did not complete."""
    call = parsed_call(text)
    if call is None:
        return []
    return [{"id": call_id(), "type": "function", "function": {"name": call[0], "arguments": call[1]}}]
