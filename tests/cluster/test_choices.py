"""The worker's generation loop as events (cluster/choices.py), in process on the real default
model: tools rendered by a tool-aware chat template and the model's own call parsed back
(tool_choice "auto"); n choices each ending once; echo with the prompt's logprobs."""

import asyncio

import llguidance

from lessserve.cluster.choices import TokenTexts, choice_events, sampling_params
from lessserve.cluster.protocol import EndEvent, PromptEvent, TokenEvent, TurnRequest
from lessserve.workers.chat_session import ChatMessages, encode, render
from lessserve.workers.scheduler import BatchScheduler

HERMES = ("{%- if tools %}<|im_start|>system\nYou may call these functions: <tools>{% for t in tools %}"
          "{{ t | tojson }}{% endfor %}</tools>. Call one as <tool_call>{\"name\": ..., \"arguments\": ...}"
          "</tool_call><|im_end|>\n{%- endif %}{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
          "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def events(engine, req, ids, forks=()):
    async def main():
        with BatchScheduler(engine) as sched:
            slot = sched.call(engine.alloc)
            constraint = engine.grammars.constraint(req.grammar) if req.grammar else None
            params = sampling_params(engine, req, constraint, list(forks))
            return [ev async for ev in choice_events(engine, sched, TokenTexts(engine), req, slot, ids, params, [], {})]

    return asyncio.run(main())


def test_auto_tool_choice_renders_the_tools_and_parses_the_models_call(default_engine):
    engine = default_engine(chat_template=HERMES)
    msgs = ChatMessages([{"role": "user", "content": "Weather in Paris?"}], TOOLS)
    prompt = render(engine.tokenizer, msgs)
    assert "get_weather" in prompt and "<tools>" in prompt  # the template rendered the tools
    # the model's reply is steered into the family's call syntax by a grammar, so the parse is exercised
    grammar = llguidance.LLMatcher.grammar_from_regex(
        r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,8}"\}\}</tool_call>')
    req = TurnRequest(owner="o", messages=list(msgs), max_tokens=40, tools=TOOLS, auto_tools=True, grammar=grammar)
    evs = events(engine, req, encode(engine.tokenizer, prompt))
    (end,) = [e for e in evs if isinstance(e, EndEvent)]
    assert end.finish_reason == "tool_calls" and end.tool_calls[0][0] == "get_weather"
    assert end.tool_calls[0][1].startswith('{"city":"') and end.content == ""


def test_n_choices_each_end_once_and_echo_carries_the_prompt_logprobs(default_engine):
    engine = default_engine(max_slots=3)
    tok = engine.tokenizer
    ids = tok("The capital of France is")["input_ids"]
    req = TurnRequest(owner="o", prompt=ids, max_tokens=5, n=3, temperature=1.0, seed=1, logprobs=1,
                      prompt_logprobs=1, echo=True)
    forks = [engine.alloc(), engine.alloc()]
    evs = events(engine, req, ids, forks)
    (prompt,) = [e for e in evs if isinstance(e, PromptEvent)]
    assert prompt.logprobs[0] is None and len(prompt.logprobs) == len(ids) == len(prompt.tokens)
    assert "".join(prompt.tokens) == prompt.text
    ends = [e for e in evs if isinstance(e, EndEvent)]
    assert sorted(e.index for e in ends) == [0, 1, 2]
    for i in range(3):
        toks = [e for e in evs if isinstance(e, TokenEvent) and e.index == i]
        assert sum(len(t.logprobs) for t in toks) == next(e.completion_tokens for e in ends if e.index == i)
