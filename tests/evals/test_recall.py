"""`lessserve eval recall`: deterministic conversations of the requested length with the fact turns
before the question, Wilson intervals, the CLI end to end on the real default model, bad flags."""

from __future__ import annotations

import copy
import json

import pytest

from lessserve.cli.main import main
from lessserve.evals.recall import wilson
from lessserve.evals.recall_cases import (
    ACK,
    ANSWER_TOKENS,
    KIND_BY_NAME,
    KINDS,
    PLAIN_TEMPLATE,
    RecallCase,
    answer_ok,
    messages_at,
    question_prompt,
    recall_cases,
    rendered_tokens,
)
from lessserve.lab.corpus import shared_parts

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # 2 shared cores: one intra-op thread


@pytest.fixture(scope="module")
def plain_tokenizer():
    from lessserve.workers.model_loader import load_checkpoint, load_tokenizer

    tok = copy.copy(load_tokenizer(load_checkpoint("smollm2-135m-instruct").folder))
    tok.chat_template = PLAIN_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def dev_texts():
    return shared_parts("dev")


def test_cases_are_deterministic_in_the_seed(plain_tokenizer, dev_texts):
    a = recall_cases(plain_tokenizer, [256, 512], 4, seed=3, texts=dev_texts)
    b = recall_cases(plain_tokenizer, [256, 512], 4, seed=3, texts=dev_texts)
    c = recall_cases(plain_tokenizer, [256, 512], 4, seed=4, texts=dev_texts)
    assert a == b
    assert a != c
    assert [x.kind for x in a[512]] == [k.name for k in KINDS]  # every kind, in turn


@pytest.mark.parametrize("length", [256, 1024, 8192])
def test_histories_reach_the_length_with_the_fact_turns_before_the_question(plain_tokenizer, dev_texts, length):
    for case in recall_cases(plain_tokenizer, [length], 4, seed=0, texts=dev_texts)[length]:
        last = messages_at(case, case.question_turn, "plain")
        assert 0 <= length - ANSWER_TOKENS - rendered_tokens(plain_tokenizer, last) <= 8  # never past `length`
        assert 4 <= case.turns <= 20
        assert case.question_turn - case.fact_turn >= 2  # at least one filler turn between them
        users = [m["content"] for m in last if m["role"] == "user"]
        assert len(users) == case.turns
        assert [i for i, u in enumerate(users) if case.fact in u] == [case.fact_turn]
        assert case.fact not in " ".join(users[case.fact_turn + 1:])  # asked, never restated
        assert [m["content"] for m in last if m["role"] == "assistant"][:-1] == [ACK] * (case.turns - 1)
        assert 0 < case.distance_tokens < case.tokens
        floor = messages_at(case, case.question_turn, "plain", floor=True)
        assert not any(case.fact in m["content"] for m in floor)


def test_question_prompt_splits_where_the_question_turn_starts(plain_tokenizer, dev_texts):
    """What a question-agnostic peer compresses (evals/peer_kvpress.py --task recall) is the history
    through the last acknowledgement; the rest is the question turn, with the answer cue."""
    for case in recall_cases(plain_tokenizer, [512], 4, seed=1, texts=dev_texts)[512]:
        ids, cut = question_prompt(plain_tokenizer, case)
        assert len(ids) == rendered_tokens(plain_tokenizer, messages_at(case, case.question_turn, "plain"))
        context, question = plain_tokenizer.decode(ids[:cut]), plain_tokenizer.decode(ids[cut:])
        assert case.fact in context and context.rstrip().rstrip(".").endswith("Assistant: " + ACK.rstrip("."))
        assert KIND_BY_NAME[case.kind].question in question and question.endswith(KIND_BY_NAME[case.kind].cue)
        assert case.fact not in question


def test_each_turn_extends_the_previous_rendering(plain_tokenizer, dev_texts):
    """The session path prefills only what is new: turn t+1's prompt starts with turn t's."""
    case = recall_cases(plain_tokenizer, [512], 1, seed=0, texts=dev_texts)[512][0]
    render = lambda t: plain_tokenizer.apply_chat_template(  # noqa: E731
        messages_at(case, t, "plain"), add_generation_prompt=True, tokenize=False)
    for t in range(case.turns - 1):
        assert render(t + 1).startswith(render(t))
    assert render(case.question_turn).endswith("Assistant: " + KINDS[0].cue)


@pytest.mark.parametrize("answer,kind,value,ok", [
    (" 52445.\nUser: x", "passkey", "52445", True),
    (" 52,445 is it", "passkey", "52445", True),
    (" 524450", "passkey", "52445", False),
    (" Rosalind.", "name", "Rosalind", True),
    (" rosalinda", "name", "Rosalind", False),
    (' "Quiet  Anchor".', "phrase", "quiet anchor", True),
    (" quiet", "phrase", "quiet anchor", False),
])
def test_answers_are_normalised(answer, kind, value, ok):
    case = RecallCase(kind, value, "", 0, ["x", "y"], "brown")
    assert answer_ok(answer, case) is ok


@pytest.mark.parametrize("hits,n,lo,hi", [
    (0, 10, 0.0, 0.27753),  # roots of (p - x)^2 = z^2 x (1 - x) / n, z = 1.96
    (10, 10, 0.72247, 1.0),
    (5, 10, 0.23659, 0.76341),
    (81, 263, 0.25529, 0.36621),  # Newcombe 1998, table I
    (1, 2, 0.09453, 0.90547),
])
def test_wilson_interval_known_values(hits, n, lo, hi):
    got = wilson(hits, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_cli_end_to_end_on_the_default_model(tmp_path):
    out, png = tmp_path / "recall.json", tmp_path / "recall.png"
    assert main(["eval", "recall", "--policies", "full,h2o,floor", "--budgets", "32", "--lengths", "256",
                 "--cases", "2", "--seed", "0", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["full", "h2o", "floor"]
    for r in rows:
        assert {"policy", "budget", "length", "accuracy", "ci_low", "ci_high", "cases"} <= set(r)
        assert r["length"] == 256 and r["cases"] == 2 and r["format"] == "plain"
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
        assert r["host_restores"] == round(2 * (r["turns"] - 1)) and r["recomputes"] == 0  # the real tier path
    assert rows[1]["budget"] == 32
    assert rows[0]["accuracy"] == 1.0 and rows[2]["accuracy"] == 0.0  # ceiling and floor on these cases
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("argv,flag", [
    (["--lengths", "10"], "--lengths"),
    (["--budgets", "x"], "--budgets"),
    (["--policies", "full,nope"], "--policies"),
    (["--cases", "0"], "--cases"),
    (["--chat-template", "{{ x }}"], "--chat-template"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as ex:
        main(["eval", "recall", *argv])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "Traceback" not in err[0]
