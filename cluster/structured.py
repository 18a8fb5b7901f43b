"""Structured outputs at the router: `response_format` and forced tool calls become the grammar a
worker enforces (workers/constraints.py), and a forced call's JSON becomes the client's tool_calls.

    response_format {"type": "json_object"}                 any JSON object
    response_format {"type": "json_schema", "json_schema"}  that schema (strict or not: always enforced)
    tool_choice "required" / {"type": "function", ...}      {"name": <one of the tools>, "arguments": <its parameters>}

`tool_choice: "auto"` needs a chat template that renders tools and a parser for the model family's
call syntax; this server does not have one yet, so "auto" with tools is refused by name (400),
and "none" sends the tools to the template without calls."""

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


def tool_call_schema(tools: list[dict], name: str | None) -> dict[str, Any]:
    """One call of a named tool (or of any tool): {"name": ..., "arguments": {...}}."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise GrammarError(f"tool_choice names {name!r}, which is not among the tools")

    def one(f: dict) -> dict:
        params = f.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                "required": ["name", "arguments"], "additionalProperties": False}

    return one(chosen[0]) if len(chosen) == 1 else {"anyOf": [one(f) for f in chosen]}


def tool_grammar(tools: list[dict] | None, choice: str | dict | None) -> tuple[str | None, bool]:
    """-> (the grammar of a forced call or None, whether the reply is a tool call)."""
    if not tools or choice in (None, "none"):
        return None, False
    if choice == "auto":
        raise GrammarError("tool_choice 'auto': this server cannot yet parse a model's own tool calls; "
                           "send tool_choice 'required' or name the function (enforced by a grammar), or 'none'")
    name = None if choice == "required" else choice["function"]["name"]
    return json_schema_grammar(tool_call_schema(tools, name)), True


def tool_calls(text: str) -> list[dict]:
    """A forced call's text (grammar-valid JSON) -> OpenAI tool_calls; [] if it did not complete."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]
