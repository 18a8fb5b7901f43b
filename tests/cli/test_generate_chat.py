"""`lessserve generate` and `lessserve chat` in process, on the default model: they generate through
the server's scheduler and print what an independent greedy loop (tests/workers/replay.py) decodes."""

from __future__ import annotations

import pytest

from lessserve.cli.main import main
from lessserve.workers.chat_session import Transcript, encode, plan_turn, render
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.reply import Reply
from tests.workers.replay import greedy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FLAGS = ["--policy", "h2o", "--budget", "32", "--chunk", "16"]


def reference(engine: Engine, history: list[list[dict]], n: int) -> list[str]:
    """Each turn's reply for successive message histories, one slot, greedy, no scheduler."""
    slot, tr, out = engine.alloc(), Transcript(), []
    for messages in history:
        plan = plan_turn(engine.tokenizer, tr, messages)
        gen = greedy(engine, slot, plan.new_ids, n)
        out.append("".join(Reply(engine.tokenizer, engine.stop_ids).pieces(gen)))
        tr.ids += plan.new_ids + gen[:-1]
        tr.text = plan.prompt_text + engine.tokenizer.decode(gen[:-1], skip_special_tokens=False)
    return out


def test_generate_prints_the_greedy_reply_and_its_stats(capsys):
    assert main(["generate", "--prompt", "Name a colour.", "--max-new-tokens", "10", "--stats", *FLAGS]) == 0
    out, err = capsys.readouterr()
    engine = Engine(EngineConfig(policy="h2o", budget=32, prefill_chunk=16, max_slots=1))
    ids = encode(engine.tokenizer, render(engine.tokenizer, [{"role": "user", "content": "Name a colour."}]))
    want = "".join(Reply(engine.tokenizer, engine.stop_ids).pieces(greedy(engine, engine.alloc(), ids, 10)))
    assert out == want + "\n" and want.strip()
    assert "cached_tokens=" in err and "budget=" in err


def test_chat_continues_the_conversation_turn_after_turn(monkeypatch, capsys):
    lines = iter(["Name a colour.", "Why that one?"])
    monkeypatch.setattr("builtins.input", lambda prompt="", it=lines: _next_or_eof(it))
    assert main(["chat", "--max-new-tokens", "8", *FLAGS]) == 0
    out = capsys.readouterr().out
    engine = Engine(EngineConfig(policy="h2o", budget=32, prefill_chunk=16, max_slots=1))
    first_msgs = [{"role": "user", "content": "Name a colour."}]
    first = reference(engine, [first_msgs], 8)[0]
    engine = Engine(EngineConfig(policy="h2o", budget=32, prefill_chunk=16, max_slots=1))
    second_msgs = [*first_msgs, {"role": "assistant", "content": first}, {"role": "user", "content": "Why that one?"}]
    want = reference(engine, [first_msgs, second_msgs], 8)
    replies = [chunk.split("\n[cached_tokens=")[0] for chunk in out.split("bot> ")[1:]]
    assert replies == want
    assert "prefilled=" in out


def _next_or_eof(it):
    try:
        return next(it)
    except StopIteration:
        raise EOFError from None


@pytest.mark.parametrize("argv, flag", [
    (["generate", "--prompt", "hi", "--max-model-len", "999999"], "--max-model-len"),
    (["chat", "--chat-template", "/no/such/template"], "--chat-template"),
    (["generate", "--prompt", "hi", "--chat-template", "/no/such/template"], "--chat-template"),
])
def test_model_flags_of_generate_and_chat_are_checked_and_named(argv, flag, capsys):
    with pytest.raises(SystemExit) as ex:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1 and err[0].split("error: ")[1].startswith(flag)


def test_chat_template_and_max_model_len_reach_generate(capsys):
    template = "{% for m in messages %}Q: {{ m.content }}\n{% endfor %}A:"
    assert main(["generate", "--prompt", "Name a colour.", "--max-new-tokens", "4", "--chat-template", template,
                 "--max-model-len", "64", "--stats", *FLAGS]) == 0
    engine = Engine(EngineConfig(policy="h2o", budget=32, prefill_chunk=16, max_slots=1, chat_template=template))
    ids = encode(engine.tokenizer, "Q: Name a colour.\nA:")
    want = "".join(Reply(engine.tokenizer, engine.stop_ids).pieces(greedy(engine, engine.alloc(), ids, 4)))
    assert capsys.readouterr().out == want + "\n"
    with pytest.raises(SystemExit):  # a prompt past --max-model-len is refused, not truncated
        main(["generate", "--prompt", "word " * 80, "--max-model-len", "64", *FLAGS])
