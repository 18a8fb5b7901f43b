"""`lessserve eval report` writes JSON, markdown and plots with gap-closed figures and kernel marks."""

import json

from lessserve.cluster.cli import main


def test_report_small(tmp_path):
    out = tmp_path / "rep"
    assert main(["eval", "report", "--policies", "full,h2o,h2o+,h2o+less", "--budgets", "32", "--context", "96",
                 "--windows", "1", "--lengths", "96", "--trials", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
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
