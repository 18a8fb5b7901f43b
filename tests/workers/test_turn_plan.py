"""Turn planning (workers/chat_session.py plan_turn) on a character-level fake tokenizer: only the
new suffix is prefilled when the rendering extends what the cache consumed; anything else (a new
session, an edit, a shorter or equal rendering, a transcript without ids) rebuilds from scratch."""

from __future__ import annotations

import pytest

from lessserve.workers.chat_session import Transcript, encode, plan_turn, render


class CharTokenizer:
    """One token per character; the chat template is `<role>content</role>` per message."""

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        self.calls.append(text)
        return {"input_ids": [ord(c) for c in text]}


TOK = CharTokenizer()
M1 = [{"role": "user", "content": "hi"}]
M2 = [*M1, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "more"}]


def consumed(messages) -> Transcript:
    """The transcript after a turn over `messages` (its rendering consumed, ids included)."""
    text = render(TOK, messages)
    return Transcript(ids=encode(TOK, text), text=text, messages=list(messages), turns=1)


def test_render_and_encode():
    assert render(TOK, M1) == "<user>hi</user><assistant>"
    assert encode(TOK, "ab") == [97, 98]


def test_a_new_session_prefills_its_whole_rendering():
    plan = plan_turn(TOK, Transcript(), M1)
    assert plan.rebuild and plan.prompt_text == render(TOK, M1) and plan.new_ids == encode(TOK, render(TOK, M1))


def test_an_extension_prefills_only_the_new_suffix():
    tr = consumed(M1)
    tr.text = "<user>hi</user><assistant>yo</assistant>"  # the reply the cache consumed
    plan = plan_turn(TOK, tr, M2)
    full = render(TOK, M2)
    assert not plan.rebuild and plan.prompt_text == full
    assert plan.new_ids == encode(TOK, full[len(tr.text):]) and len(plan.new_ids) == len(full) - len(tr.text)


@pytest.mark.parametrize("case", ["edited", "same", "shorter", "no_ids"])
def test_anything_but_an_extension_rebuilds(case):
    tr = consumed(M2)
    msgs = {"edited": [{"role": "user", "content": "HI"}, *M2[1:]], "same": M2, "shorter": M1,
            "no_ids": [*M2, {"role": "user", "content": "x"}]}[case]
    if case == "no_ids":
        tr.ids = []
    plan = plan_turn(TOK, tr, msgs)
    assert plan.rebuild and plan.new_ids == encode(TOK, render(TOK, msgs)) and plan.prompt_text == render(TOK, msgs)
