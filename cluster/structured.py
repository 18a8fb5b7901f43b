"""Structured outputs at the router: `response_format` and forced tool calls become the grammar a
worker enforces (workers/constraints.py), and a forced call's JSON becomes the client's tool_calls.

    response_format {"type": "json_object"}                 any JSON object
    response_format {"type": "json_schema", "json_schema"}  that schema (strict or not: always enforced)
    tool_choice "required" / {"type": "function", ...}      {"name": <one of the tools>, "arguments": <its parameters>}

`tool_choice: "auto"` (OpenAI's default when tools are sent) needs a chat template that renders
tools and a parser for the model family's call syntax; this server does not have one yet, so tools
without tool_choice, or with "auto", are refused by name (400); with "none" no call is made."""

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


def tool_grammar(functions: list[dict] | None, choice: str | None, named: str | None = None) -> tuple[str | None, bool]:
    """functions: {"name", "parameters", ...}; choice: "none" / "auto" / "required" / None, or
    `named` (a function's name) -> (the grammar of a forced call or None, whether the reply is a call)."""
    if not functions or (choice == "none" and named is None):
        return None, False
    if choice in (None, "auto") and named is None:  # OpenAI's default with tools is "auto"
        raise GrammarError("tool_choice 'auto' (the default with tools): this server cannot yet parse a model's "
                           "own tool calls; send tool_choice 'required' or name the function (enforced by a "
                           "grammar), or 'none'")
    return json_schema_grammar(tool_call_schema(functions, named)), True


def plan(functions: list[dict] | None, choice: str | None, named: str | None, fmt: dict | None,
         fmt_field: str) -> tuple[str | None, bool]:
    """(the grammar the reply follows, whether it is a forced tool call); what cannot be enforced
    is a 400 naming its field (`fmt_field`: where the API keeps its response format)."""
    from lessserve.cluster.http_errors import ApiError

    try:
        grammar, calls = tool_grammar(functions, choice, named)
    except GrammarError as e:
        raise ApiError(400, f"{'tool_choice' if 'tool_choice' in str(e) else 'tools'}: {e}",
                       param="tool_choice" if "tool_choice" in str(e) else "tools") from None
    if calls:
        return grammar, True
    try:
        return response_format_grammar(fmt), False
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
