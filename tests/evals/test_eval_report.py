"""`lessserve eval report` writes JSON, markdown and plots with gap-closed figures and kernel marks."""

import json

from lessserve.cli.main import main


def test_report_small(tmp_path, capsys):
    out, cache = tmp_path / "rep", tmp_path / "rows.jsonl"
    argv = ["eval", "report", "--policies", "full,h2o,h2o+,h2o+less", "--budgets", "32", "--context", "96",
            "--windows", "2", "--lengths", "96", "--trials", "1", "--out", str(out), "--cache", str(cache),
            "--peers", str(tmp_path / "none.json")]
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(cache.read_text().splitlines()) == 12 + 4  # every ppl and passkey row, as it finished
    # A re-run reuses every row (nothing recomputed, same report); --fresh recomputes, same numbers.
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().err.count("(cached)") == 12
    assert json.loads((out / "report.json").read_text()) == rep and len(cache.read_text().splitlines()) == 16
    assert main([*argv, "--fresh"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert [round(r["ppl"], 6) for r in again["ppl"]] == [round(r["ppl"], 6) for r in rep["ppl"]]
    rows = {(r["text"], r["policy"]): r for r in rep["ppl"]}
    assert len(rows) == 12 and rep["less_state_tokens"] >= 1 and rep["part"] == "test"
    assert rows[("tinyshakespeare", "h2o+")]["budget"] == 32 + rep["less_state_tokens"]
    assert rows[("tinyshakespeare", "h2o+less")]["kernels"] == "trained at 128"  # shipped b128 maps used at 32
    assert all(len(r["window_nll"]) == 2 and sum(r["window_tokens"]) == r["tokens"] for r in rep["ppl"])
    gaps = {(g["text"], g["policy"]) for g in rep["gap_closed"]}
    assert gaps <= {(t, "h2o") for t in ("brown", "tinyshakespeare", "python_docs")}
    for g in rep["gap_closed"]:
        r = {p: rows[(g["text"], p)]["ppl"] for p in ("full", "h2o", "h2o+less")}
        assert abs(g["gap_closed"] - (r["h2o"] - r["h2o+less"]) / (r["h2o"] - r["full"])) < 1e-9
        assert g["ci_low"] <= g["gap_closed"] <= g["ci_high"] and g["windows"] == 2
        assert g["plus_ci_low"] <= g["plus_gap_closed"] <= g["plus_ci_high"]
    assert len(rep["passkey"]) == 4
    for png in ("ppl_brown.png", "ppl_tinyshakespeare.png", "ppl_python_docs.png", "passkey.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "Gap closed" in md and f"--trials 1 --out {out}`" in md  # the command that regenerates it


def test_report_windows_come_from_the_test_part_only(tmp_path):
    from lessserve.lab.corpus import corpus_paths, part_bounds, read_file

    text = read_file(corpus_paths()["tinyshakespeare"])[0]
    lo, hi = part_bounds(text, "test")
    assert hi == len(text) and 0.94 * len(text) < lo < 0.96 * len(text) and text[lo - 1] == "\n"
    assert part_bounds(text, "dev")[1] == lo and part_bounds(text, "train")[1] == part_bounds(text, "dev")[0]


def test_bootstrap_interval_is_paired_and_covers_the_point():
    from lessserve.lab.bootstrap import gap_closed_ci

    full, base = [100.0, 200.0, 150.0, 120.0], [130.0, 260.0, 190.0, 150.0]
    less = [b - 0.4 * (b - f) for f, b in zip(full, base, strict=True)]  # closes 40% of every window's NLL gap
    g = gap_closed_ci(full, base, less, [100, 100, 100, 100], versus=base)
    assert g["low"] <= g["value"] <= g["high"] and g["high"] - g["low"] < 0.05
    assert g["diff_low"] > 0  # better than the base itself in every resample
    one = gap_closed_ci(full[:1], base[:1], less[:1], [100])
    assert one["windows"] == 1 and one["low"] != one["low"]  # one window: no interval (nan)


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
