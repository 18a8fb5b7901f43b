"""A model's own tool calls read back from its reply, per family, and the parser chosen from the
chat template (tool_choice "auto")."""

import json

from lessserve.workers.tool_parsers import ToolParser, parser_for


def test_hermes_calls_in_order_with_the_text_before_them():
    text = 'Let me look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n' \
           '<tool_call>{"name": "b", "arguments": "{\\"y\\": [2]}"}</tool_call>'
    content, calls = ToolParser("hermes").parse(text)
    assert content == "Let me look." and calls == [("a", '{"x":1}'), ("b", '{"y":[2]}')]


def test_malformed_or_absent_calls_leave_the_reply_as_text():
    for text in ("no call here", '<tool_call>{"name": "a", "arguments": {</tool_call>', '<tool_call>{"x": 1}'):
        assert ToolParser("hermes").parse(text) == (text, [])
    for text in ("plain words", '{"parameters": {}}', "{not json"):
        assert ToolParser("llama3_json").parse(text) == (text, [])


def test_llama3_json_calls():
    content, calls = ToolParser("llama3_json").parse('<|python_tag|>{"name": "f", "parameters": {"q": "x"}}; '
                                                     '{"name": "g", "parameters": {}}')
    assert content == "" and calls == [("f", '{"q":"x"}'), ("g", "{}")]
    assert json.loads(calls[0][1]) == {"q": "x"}


def test_the_parser_comes_from_the_template():
    assert parser_for(None) is None and parser_for("{{ messages }}") is None  # renders no tools
    assert parser_for("{% if tools %}<tool_call>{% endif %}").name == "hermes"  # Qwen2.5 / Qwen3 / Hermes
    assert parser_for('{% if tools %}{"name": ..., "parameters": ...}{% endif %}').name == "llama3_json"
    assert parser_for("{% if tools %}[TOOL_CALLS]{% endif %}") is None  # a syntax without a parser here
