"""A model's own tool calls, read back from its reply (OpenAI `tool_choice: "auto"`): each model
family writes calls in the syntax its chat template teaches it. The parser is chosen from the
template; a template without one means "auto" is refused (the router's 400).

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>   Qwen2.5, Qwen3, Hermes
    llama3_json  {"name": ..., "parameters": {...}}                         Llama 3.1, 3.2, 3.3
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

Call = tuple[str, str]  # (function name, arguments as JSON text)

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _call(obj: object, args_key: str) -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return obj["name"], json.dumps(args, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ToolParser:
    name: str

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """-> (the reply's text outside any call, the calls in order); no calls: (text, [])."""
        if self.name == "hermes":
            calls = []
            for m in _HERMES.finditer(text):
                try:
                    call = _call(json.loads(m.group(1)), "arguments")
                except json.JSONDecodeError:
                    call = None
                if call is None:
                    return text, []  # a malformed call: the reply is text, as the model wrote it
                calls.append(call)
            return (text[: text.find("<tool_call>")].strip(), calls) if calls else (text, [])
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        for part in body.split(";"):
            try:
                call = _call(json.loads(part), "parameters")
            except json.JSONDecodeError:
                return text, []
            if call is None:
                return text, []
            calls.append(call)
        return "", calls


def parser_for(chat_template: str | None) -> ToolParser | None:
    t = chat_template or ""
    if "tools" not in t:
        return None
    if "<tool_call>" in t:
        return ToolParser("hermes")
    if "<|python_tag|>" in t or '"parameters"' in t:
        return ToolParser("llama3_json")
    return None
