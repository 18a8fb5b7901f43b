"""`lessserve eval report` writes JSON, markdown and plots with gap-closed figures and kernel marks."""

import json

from lessserve.cli.main import main


def test_report_small(tmp_path, capsys):
    out, cache = tmp_path / "rep", tmp_path / "rows.jsonl"
    argv = ["eval", "report", "--policies", "full,h2o,h2o+,h2o+less", "--budgets", "32", "--context", "96",
            "--windows", "1", "--lengths", "96", "--trials", "1", "--out", str(out), "--cache", str(cache)]
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(cache.read_text().splitlines()) == 8 + 4  # every ppl and passkey row, as it finished
    # A re-run reuses every row (nothing recomputed, same report); --fresh recomputes, same numbers.
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().err.count("(cached)") == 8
    assert json.loads((out / "report.json").read_text()) == rep and len(cache.read_text().splitlines()) == 12
    assert main([*argv, "--fresh"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert [round(r["ppl"], 6) for r in again["ppl"]] == [round(r["ppl"], 6) for r in rep["ppl"]]
    rows = {(r["text"], r["policy"]): r for r in rep["ppl"]}
    assert len(rows) == 8 and rep["less_state_tokens"] >= 1
    assert rows[("tinyshakespeare", "h2o+")]["budget"] == 32 + rep["less_state_tokens"]
    assert rows[("tinyshakespeare", "h2o+less")]["kernels"] == "trained at 128"  # shipped b128 kernels used at 32
    gaps = {(g["text"], g["policy"]) for g in rep["gap_closed"]}
    assert gaps == {("brown_heldout", "h2o"), ("tinyshakespeare", "h2o")}
    for g in rep["gap_closed"]:
        r = {p: rows[(g["text"], p)]["ppl"] for p in ("full", "h2o", "h2o+less")}
        assert abs(g["gap_closed"] - (r["h2o"] - r["h2o+less"]) / (r["h2o"] - r["full"])) < 1e-9
    assert len(rep["passkey"]) == 4
    for png in ("ppl_brown_heldout.png", "ppl_tinyshakespeare.png", "passkey.png"):
        assert (out / png).stat().st_size > 1000
    assert "Gap closed" in (out / "report.md").read_text()


def test_row_cache_keys_change_with_the_kernels(tmp_path):
    from lessserve.evals.row_cache import RowCache, row_key

    c = RowCache(tmp_path / "r.jsonl")
    k1, k2 = row_key(kind="ppl", less="aaaa", policy="h2o+less"), row_key(kind="ppl", less="bbbb", policy="h2o+less")
    assert k1 != k2
    c.put(k1, {"ppl": 1.5})
    with (tmp_path / "r.jsonl").open("a") as f:
        f.write('{"key": "torn')  # an interrupted write
    again = RowCache(tmp_path / "r.jsonl")
    assert again.get(k1) == {"ppl": 1.5} and again.get(k2) is None and again.hits == 1
