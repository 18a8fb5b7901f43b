"""`lessserve bench interference` on the default model: every case measures the short sessions' gaps
that overlap the long work, and the rebuild and shared-prompt cases report the one-go stall."""

from __future__ import annotations

import json

from lessserve.bench.interference import CASES, percentile
from lessserve.cli.main import main


def test_percentile_is_nearest_rank():
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == 50 and percentile(xs, 99) == 99 and percentile(xs, 100) == 100
    assert percentile([3.0], 99) == 3.0


def test_interference_rows_table_json_and_plot(tmp_path, capsys, one_torch_thread):
    out = tmp_path / "i.json"
    png = tmp_path / "i.png"
    assert main(["bench", "interference", "--long-tokens", "160", "--shorts", "2", "--new-tokens", "16",
                 "--repeats", "1", "--chunk", "32", "--budget", "32", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == list(CASES)
    for r in rows:
        assert r["itl_samples"] > 0 and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"] <= r["itl_max_ms"]
        assert (r["long_ttft_s"] is None) == (r["case"] == "alone")
        assert (r["one_go_stall_ms"] is not None) == (r["case"] in ("rebuild", "shared prompt"))
    assert png.stat().st_size > 1000 and "one-go prefill" in capsys.readouterr().out
