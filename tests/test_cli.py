"""CLI: bad input exits 2 with one line naming the flag; eval commands write JSON."""

import json
import subprocess
import sys

import pytest

from lessserve.cluster.cli import main

SHARED = "../shared/data/tinyshakespeare.txt"


@pytest.mark.parametrize("argv,flag", [
    (["generate", "--prompt", "hi", "--policy", "bogus"], "--policy"),
    (["generate", "--prompt", "hi", "--budget", "1"], "--budget"),
    (["generate", "--prompt", "hi", "--model", "/no/such/model"], "--model"),
    (["generate", "--prompt", "hi", "--policy", "h2o+less", "--model", "/no/x.gguf"], "--model"),
    (["eval", "ppl", "--text", "/no/such/file.txt"], "--text"),
    (["eval", "ppl", "--text", SHARED, "--budgets", "64,x"], "--budgets"),
    (["eval", "passkey", "--lengths", "0"], "--lengths"),
    (["generate", "--prompt", "hi", "--less-kernels", "/no/k.safetensors", "--policy", "h2o+less"],
     "--less-kernels"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "Traceback" not in err[0]


def test_console_script_unknown_policy_no_traceback():
    r = subprocess.run([sys.executable, "-m", "lessserve.cluster.cli", "generate", "--prompt", "x",
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
