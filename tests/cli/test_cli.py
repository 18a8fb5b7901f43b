"""CLI: bad input exits 2 with one line naming the flag; eval commands write JSON."""

import json
import subprocess
import sys

import pytest

from lessserve.cli.main import main

SHARED = "../shared/data/tinyshakespeare.txt"


@pytest.mark.parametrize("argv,flag", [
    (["generate", "--prompt", "hi", "--policy", "bogus"], "--policy"),
    (["generate", "--prompt", "hi", "--budget", "1"], "--budget"),
    (["generate", "--prompt", "hi", "--model", "/no/such/model"], "--model"),
    (["generate", "--prompt", "hi", "--policy", "h2o+less", "--model", "/no/x.gguf"], "--model"),
    (["eval", "ppl", "--text", "/no/such/file.txt"], "--text"),
    (["eval", "ppl", "--text", SHARED, "--budgets", "64,x"], "--budgets"),
    (["eval", "passkey", "--lengths", "0"], "--lengths"),
    (["generate", "--prompt", "hi", "--less-weights", "/no/k.safetensors", "--policy", "h2o+less"],
     "--less-weights"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "Traceback" not in err[0]


def test_console_script_unknown_policy_no_traceback():
    r = subprocess.run([sys.executable, "-m", "lessserve.cli.main", "generate", "--prompt", "x",
                        "--policy", "nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--policy" in r.stderr and "Traceback" not in r.stderr


def test_eval_ppl_and_passkey_write_json(tmp_path):
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--text", SHARED, "--policies", "full,h2o", "--budgets", "32",
                 "--context", "96", "--windows", "1", "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["full", "h2o"]
    assert all(r["ppl"] > 1 and r["tokens"] == 95 for r in rows)
    assert rows[1]["cache_bytes_per_session"] < rows[0]["cache_bytes_per_session"]
    assert (tmp_path / "p.png").stat().st_size > 1000
    pk = tmp_path / "pk.json"
    assert main(["eval", "passkey", "--policies", "full", "--budgets", "32", "--lengths", "128",
                 "--trials", "1", "--json", str(pk)]) == 0
    rows = json.loads(pk.read_text())
    assert rows[0]["trials"] == 3 and 0 <= rows[0]["accuracy"] <= 1


def test_old_spellings_still_work_with_a_deprecation_line(tmp_path, capsys):
    """`train-kernels` and `--less-kernels` are aliases for one release: same errors, plus one line each."""
    with pytest.raises(SystemExit) as ex:
        main(["train-kernels", "--data", str(tmp_path / "none.txt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and "deprecated" in err[0] and "train-less" in err[0] and "--data" in err[1]
    with pytest.raises(SystemExit) as ex:
        main(["generate", "--prompt", "hi", "--policy", "h2o+less", "--less-kernels", "/no/k.safetensors"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and "--less-kernels is deprecated" in err[0] and "--less-weights" in err[1]


def test_every_help_works():
    """`lessserve --help` and every subcommand's --help exit 0 and print usage."""
    from lessserve.cli.main import build_parser

    def commands(parser, prefix):
        import argparse

        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield [*prefix, name]
                    yield from commands(sub, [*prefix, name])

    argvs = [[], *commands(build_parser(), [])]
    assert len(argvs) > 12
    for argv in argvs:
        with pytest.raises(SystemExit) as ex:
            main([*argv, "--help"])
        assert ex.value.code == 0, argv


def test_triton_without_cuda_is_one_line_naming_kernels(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: triton is available")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/kernels turns the interpreter on
    with pytest.raises(SystemExit) as ex:
        main(["generate", "--prompt", "hi", "--kernels", "triton"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1 and "--kernels" in err[0] and "Traceback" not in err[0]
