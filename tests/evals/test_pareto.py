"""`lessserve eval pareto`: every policy and kv_bits at the budget that fits each byte level, gap closed
against native h2o at the reference level, with paired-bootstrap intervals, JSON, markdown and a plot."""

from __future__ import annotations

import json

import pytest

from lessserve.cli.main import main


def test_pareto_small(tmp_path, capsys):
    out, cache = tmp_path / "q", tmp_path / "rows.jsonl"
    legal = tmp_path / "licence.txt"  # a genre never trained on, evaluated whole
    legal.write_text(" ".join(f"Clause {i}. The licensee shall retain this notice in all copies of the work."
                              for i in range(40)))
    argv = ["eval", "pareto", "--texts", "tinyshakespeare", "--extra-texts", str(legal), "--context", "96",
            "--windows", "2",
            "--levels", "8,16", "--reference", "16", "--policies", "h2o,h2o+less", "--bits", "native,8",
            "--out", str(out), "--cache", str(cache)]
    assert main(argv) == 0
    rep = json.loads((out / "pareto.json").read_text())
    assert rep["never_trained_on"] == ["licence"] and {r["text"] for r in rep["ppl"]} == {"tinyshakespeare", "licence"}
    assert len(rep["gap_closed"]) == 2 * 8 and "licence (a genre never trained on)" in (out / "pareto.md").read_text()
    rows = {(r["policy"], r["kv_bits"], r["level"]): r for r in rep["ppl"] if r["text"] == "tinyshakespeare"}
    assert len(rows) == 1 + 2 * 2 * 2 and len(cache.read_text().splitlines()) == 2 * 9
    nbytes = {int(k): v for k, v in rep["level_bytes"].items()}
    for (pol, bits, level), r in rows.items():
        if pol == "full":
            continue
        assert r["kv_bits"] == bits and r["cache_bytes_per_session"] <= nbytes[level]
        assert r["target_bytes"] == nbytes[level] and len(r["window_nll"]) == 2
    # The same bytes hold more tokens at 8 bits; the reference is native h2o at its own budget.
    assert rows[("h2o", "8", 16)]["budget"] > 2.5 * rows[("h2o", "native", 16)]["budget"] == 2.5 * 16
    assert rows[("h2o+less", "native", 16)]["budget"] < 16
    full, ref = rows[("full", "native", None)]["ppl"], rows[("h2o", "native", 16)]["ppl"]
    gaps = {(g["policy"], g["kv_bits"], g["level"]): g for g in rep["gap_closed"] if g["text"] == "tinyshakespeare"}
    assert len(gaps) == 8 and gaps[("h2o", "native", 16)]["gap_closed"] == pytest.approx(0, abs=1e-12)
    for key, g in gaps.items():
        assert g["gap_closed"] == pytest.approx((ref - rows[key]["ppl"]) / (ref - full), rel=1e-6)
        assert g["ci_low"] <= g["gap_closed"] <= g["ci_high"]
    worst = {(f["policy"], f["kv_bits"], f["level"]): f for f in rep["frontier"]}
    assert worst[("h2o", "8", 16)]["texts"] == 2 and worst[("h2o", "8", 16)]["worst_gap_closed"] == min(
        g["gap_closed"] for g in rep["gap_closed"] if (g["policy"], g["kv_bits"], g["level"]) == ("h2o", "8", 16))
    assert (out / "pareto.png").stat().st_size > 1000
    assert "--reference 16" in (out / "pareto.md").read_text()
    # A second run reuses every row.
    capsys.readouterr()
    assert main(argv) == 0 and capsys.readouterr().err.count("(cached)") == 18


@pytest.mark.parametrize("extra,flag", [(["--levels", "64,256"], "--levels"), (["--bits", "native,2"], "--bits"),
                                        (["--policies", "h2o+recall"], "--policies"),
                                        (["--texts", "nosuchtext"], "--texts"),
                                        (["--extra-texts", "/nonexistent/x.txt"], "--extra-texts")])
def test_bad_flags_name_the_flag(extra, flag, capsys):
    with pytest.raises(SystemExit) as ex:
        main(["eval", "pareto", *extra])
    assert ex.value.code == 2 and flag in capsys.readouterr().err
