"""CLI: bad input exits 2 with one line naming the flag; eval commands write JSON."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lessserve.cli.main import main

SHARED = str(Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tinyshakespeare.txt")


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
    (["generate", "--prompt", "hi", "--kv-bits", "3"], "--kv-bits"),
    (["eval", "ppl", "--text", SHARED, "--kv-bits", "int8"], "--kv-bits"),
    (["serve", "--kv-bits", "16"], "--kv-bits"),
    (["bench", "recall", "--ttft-prefix", "0,-5"], "--ttft-prefix"),
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


def independent_ppl(ckpt, ids: list[int]) -> tuple[float, float]:
    """(full-cache ppl from transformers' own model, h2o@16 ppl from the float64 oracle) of a window,
    through the CLI's default prefill chunk of 32 tokens."""
    from lessserve.workers.model_loader import transformers_model
    from tests.oracle.less_oracle import NaiveLlama, OracleSession, documented_spec
    from tests.oracle.test_oracle import cuts

    a = ckpt.args
    target = torch.tensor(ids[1:])
    hf = transformers_model(ckpt.folder).eval()
    with torch.no_grad():
        full = math.exp(float(F.cross_entropy(hf(torch.tensor([ids])).logits[0, :-1], target)))
    oracle = OracleSession(NaiveLlama(ckpt.state_dict, a.num_heads, a.num_kv_heads, a.head_dim, a.rms_norm_eps,
                                      a.rope_theta), documented_spec("h2o", 16, 0, a.head_dim, 4))
    logits = torch.cat([oracle.step(ids[o : o + c]) for o, c in cuts(0, len(ids), 32)])
    return full, math.exp(float(F.cross_entropy(logits[:-1], target)))


def test_eval_ppl_and_passkey_write_json(tmp_path, default_ckpt):
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--text", SHARED, "--policies", "full,h2o", "--budgets", "16",
                 "--context", "48", "--windows", "1", "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["full", "h2o"]
    assert all(r["tokens"] == 47 for r in rows)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_ckpt.folder))
    ids = tok(Path(SHARED).read_text()[:100_000], add_special_tokens=False)["input_ids"][:48]  # window 1 of 1
    full, h2o = independent_ppl(default_ckpt, ids)
    assert rows[0]["ppl"] == pytest.approx(full, rel=1e-4) and rows[1]["ppl"] == pytest.approx(h2o, rel=1e-4)
    assert abs(h2o / full - 1) > 1e-3  # eviction changed the predictions (the h2o row is no full-cache copy)
    assert rows[1]["cache_bytes_per_session"] < rows[0]["cache_bytes_per_session"]
    assert (tmp_path / "p.png").stat().st_size > 1000
    pk = tmp_path / "pk.json"
    assert main(["eval", "passkey", "--policies", "full", "--budgets", "32", "--lengths", "64",
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
