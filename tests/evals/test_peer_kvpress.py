"""The pure parts of the kvpress peer comparison (no kvpress, no model): budget -> compression ratio,
the shared passkey cases, and the merged table."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from lessserve.evals import passkey as ep
from lessserve.evals import passkey_prompts as pp
from lessserve.evals import peer_kvpress as pk


class CharTokenizer:
    """One token per character: enough for prompt building, answers and the question split."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


TOK = CharTokenizer()


@pytest.mark.parametrize(("budget", "ctx"), [(64, 497), (128, 1009), (256, 1985), (64, 65), (100, 333)])
def test_ratio_keeps_exactly_the_budget(budget, ctx):
    r = pk.compression_ratio(budget, ctx)
    assert 0.0 <= r < 1.0
    assert abs(r - (1 - budget / ctx)) <= 0.5 / ctx + 1e-12
    assert int(ctx * (1 - r)) == budget  # what kvpress keeps


def test_ratio_clamped_and_checked():
    assert pk.compression_ratio(256, 200) == 0.0
    assert pk.compression_ratio(200, 200) == 0.0
    with pytest.raises(ValueError):
        pk.compression_ratio(64, 0)


def test_passkey_cases_deterministic_and_as_before():
    lengths = [300, 600]
    a = pp.passkey_cases(TOK, lengths, trials_per_depth=2, seed=3)
    b = pp.passkey_cases(TOK, lengths, trials_per_depth=2, seed=3)
    assert a == b
    assert pp.passkey_cases(TOK, lengths, 2, seed=4) != a
    # the draw eval_passkey always made: lengths in order, then depths x trials
    rng = random.Random(3)
    old = {L: [(d, rng.randint(10000, 99999)) for d in pp.DEPTHS for _ in range(2)] for L in lengths}
    for L in lengths:
        assert [(d, k) for _, k, d in a[L]] == old[L]
        for ids, k, d in a[L]:
            assert ids == pp.build_prompt(TOK, L, d, k)
            assert TOK.decode(ids).endswith(pp.QUESTION)


def test_split_question():
    ids = pp.passkey_cases(TOK, [300], 1, 0)[300][0][0]
    cut = pp.split_question(TOK, ids)
    assert TOK.decode(ids[cut:]).strip() == pp.QUESTION
    assert pp.QUESTION not in TOK.decode(ids[:cut])
    with pytest.raises(ValueError):
        pp.split_question(TOK, TOK("no question here")["input_ids"])


def test_eval_passkey_uses_passkey_cases(monkeypatch):
    calls = []
    real = pp.passkey_cases

    def spy(tok, lengths, trials, seed):
        calls.append((tuple(lengths), trials, seed))
        return real(tok, lengths, trials, seed)

    monkeypatch.setattr(ep, "passkey_cases", spy)
    monkeypatch.setattr(ep, "progress", lambda msg: None)

    class Engine:
        spec = SimpleNamespace(budget=64)

    class Scheduler:  # answers with the key hidden in the prompt
        def __init__(self, engine):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def complete(self, ids, params):
            key = TOK.decode(ids).split("The pass key is ")[1][:5]
            return TOK(" " + key + ".")["input_ids"][: params.max_new_tokens]

    monkeypatch.setattr(ep, "BatchScheduler", Scheduler)

    factory = SimpleNamespace(tokenizer=TOK, make=lambda policy, budget: Engine(),
                              row_key=lambda engine, kind, **inputs: repr(sorted(inputs.items())))
    rows = ep.eval_passkey(factory, ["h2o"], [64], [300], trials_per_depth=1, seed=5)
    assert calls == [((300,), 1, 5)]
    assert rows == [{"policy": "h2o", "budget": 64, "length": 300, "accuracy": 1.0, "trials": 3}]


KV = {"header": {"versions": {"kvpress": "0.5.5", "transformers": "5.2.0", "torch": "2.13.0"}},
      "rows": [{"system": "kvpress", "policy": "no_press", "budget": 1024, "kept_tokens": 990.0, "length": L,
                "accuracy": 1.0, "trials": 6} for L in (512, 1024)]
      + [{"system": "kvpress", "policy": "SnapKVPress", "budget": b, "kept_tokens": float(b), "length": L,
          "accuracy": acc, "trials": 6} for b, L, acc in ((64, 512, 0.5), (64, 1024, 1 / 6), (128, 512, 2 / 3))]}
OURS = [{"policy": "full", "budget": 1024, "length": 512, "accuracy": 1.0, "trials": 6},
        {"policy": "h2o", "budget": 64, "length": 512, "accuracy": 0.0, "trials": 6},
        {"policy": "h2o+", "budget": 68, "length": 512, "accuracy": 1 / 3, "trials": 6},
        {"policy": "h2o+", "budget": 68, "length": 1024, "accuracy": 0.0, "trials": 6}]


def test_merge_table_layout():
    rows = pk.merge_rows(KV, OURS)
    assert {r["system"] for r in rows} == {"kvpress", "lessserve"}
    plus = [r for r in rows if r["policy"] == "h2o+"]
    assert {(r["nominal_budget"], r["kept"]) for r in plus} == {(64, 68)}
    lines = pk.table(rows).splitlines()
    assert lines[0] == "| system | policy | budget | kept | L=512 | L=1024 |"
    assert lines[1] == "|---|---|---|---|---|---|"
    body = lines[2:]
    assert body == [
        "| lessserve | full | full | all | 1.00 |  |",
        "| kvpress | no_press | full | all | 1.00 | 1.00 |",
        "| lessserve | h2o | 64 | 64 | 0.00 |  |",
        "| lessserve | h2o+ | 64 | 68 | 0.33 | 0.00 |",
        "| kvpress | SnapKVPress | 64 | 64 | 0.50 | 0.17 |",
        "| kvpress | SnapKVPress | 128 | 128 | 0.67 |  |",
    ]


def test_merge_command_writes_files(tmp_path):
    (tmp_path / "kv.json").write_text(json.dumps(KV))
    (tmp_path / "ours.json").write_text(json.dumps(OURS))
    stem = tmp_path / "out" / "peers"
    assert pk.main(["merge", "--kvpress", str(tmp_path / "kv.json"), "--ours", str(tmp_path / "ours.json"),
                    "--out", str(stem), "--no-plot"]) == 0
    merged = json.loads(stem.with_suffix(".json").read_text())
    assert merged["kvpress_header"]["versions"]["kvpress"] == "0.5.5"
    assert len(merged["rows"]) == len(KV["rows"]) + len(OURS)
    md = stem.with_suffix(".md").read_text()
    assert "kvpress 0.5.5" in md and "| kvpress | SnapKVPress | 128 | 128 | 0.67 |  |" in md
    # Re-merge: kvpress rows from the merged file, ours from a report.json (its "passkey" rows).
    (tmp_path / "report.json").write_text(json.dumps({"ppl": [], "passkey": OURS[:2]}))
    stem2 = tmp_path / "out" / "peers2"
    assert pk.main(["merge", "--kvpress", str(stem.with_suffix(".json")), "--ours", str(tmp_path / "report.json"),
                    "--out", str(stem2), "--no-plot"]) == 0
    again = json.loads(stem2.with_suffix(".json").read_text())
    assert again["kvpress_header"] == merged["kvpress_header"]
    assert len(again["rows"]) == len(KV["rows"]) + 2


def test_merge_joins_kvpress_runs_a_later_row_replacing_an_earlier(tmp_path):
    """Runs of other lengths (8,192 tokens took its own run) join one table; a rerun's row wins."""
    longer = {"header": {"command": "python -m lessserve.evals.peer_kvpress --lengths 2048", "lengths": [2048]},
              "rows": [{"system": "kvpress", "policy": "SnapKVPress", "budget": 128, "kept_tokens": 128.0,
                        "length": L, "accuracy": acc, "trials": 6} for L, acc in ((2048, 0.5), (512, 0.0))]}
    (tmp_path / "kv.json").write_text(json.dumps(KV))
    (tmp_path / "kv2.json").write_text(json.dumps(longer))
    (tmp_path / "ours.json").write_text(json.dumps(OURS))
    stem = tmp_path / "joined"
    assert pk.main(["merge", "--kvpress", str(tmp_path / "kv.json"), "--kvpress", str(tmp_path / "kv2.json"),
                    "--ours", str(tmp_path / "ours.json"), "--out", str(stem), "--no-plot"]) == 0
    merged = json.loads(stem.with_suffix(".json").read_text())
    kv = {(r["policy"], r["budget"], r["length"]): r["accuracy"] for r in merged["rows"] if r["system"] == "kvpress"}
    assert len(kv) == len(KV["rows"]) + 1
    assert kv[("SnapKVPress", 128, 2048)] == 0.5 and kv[("SnapKVPress", 128, 512)] == 0.0  # the later run's
    assert merged["kvpress_header"]["versions"]["kvpress"] == "0.5.5"
    assert merged["kvpress_header"]["command"] == [longer["header"]["command"]]  # KV's header has none


def test_bad_flags_name_the_flag(capsys):
    for argv, flag in ((["--budgets", "x"], "--budgets"), (["--presses", "Nope"], "--presses"),
                       (["--trials-per-depth", "0"], "--trials-per-depth"),
                       (["merge", "--kvpress", "/nonexistent.json", "--ours", "x", "--out", "y"], "--kvpress")):
        with pytest.raises(SystemExit) as e:
            pk.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert flag in err


def test_portable_argv_drops_machine_paths():
    argv = ["--model", "/root/.cache/x/SmolLM", "--out=/tmp/kv.json", "--lengths", "512"]
    assert pk._portable_argv(argv) == ["--model", "SmolLM", "--out=kv.json", "--lengths", "512"]


def test_recall_task_cases_are_our_conversations_split_before_the_question():
    """--task recall: the same conversations `eval recall --format plain` runs (same seed, texts and
    tokenizer), the compressed part ending before the question turn, and the scorer of our side."""
    import copy

    from lessserve.evals import recall_cases as rc
    from lessserve.lab.corpus import shared_parts
    from lessserve.workers.model_loader import load_checkpoint, load_tokenizer

    tok = load_tokenizer(load_checkpoint("smollm2-135m-instruct").folder)
    got = pk.task_cases(tok, SimpleNamespace(task="recall", lengths=[512], cases=2, seed=0, part="dev"))
    plain = copy.copy(tok)
    plain.chat_template = rc.PLAIN_TEMPLATE
    convs = rc.recall_cases(plain, [512], 2, 0, shared_parts("dev"), "plain")[512]
    assert len(got[512]) == 2
    for (ids, cut, check), case in zip(got[512], convs, strict=True):
        assert (ids, cut) == rc.question_prompt(plain, case)
        assert case.fact in tok.decode(ids[:cut]) and case.fact not in tok.decode(ids[cut:])
        assert check(tok(" " + case.answer + ".", add_special_tokens=False)["input_ids"])
        assert not check(tok(" nothing here", add_special_tokens=False)["input_ids"])
