"""`bench structured`: a row per (batch, mode) with the forward pass and the loop's other work
split, the grammar's share read against the free run; written as JSON and a PNG."""

from __future__ import annotations

import json

from lessserve.bench.structured import run_structured
from lessserve.workers.config import EngineConfig


def test_rows_per_batch_and_mode_and_files(tmp_path, one_torch_thread):
    res = run_structured(EngineConfig(budget=32, device="cpu"), [1, 2], tokens=12, repeats=1)
    assert [(r["batch"], r["mode"]) for r in res.rows] == [(b, m) for b in (1, 2)
                                                          for m in ("free", "regex", "json_schema")]
    for r in res.rows:
        assert r["steps"] >= 1 and r["decode_ms_per_step"] > 0 and r["step_ms"] >= r["decode_ms_per_step"]
        assert r["tokens"] <= 12 * r["batch"]
    assert all(r["grammar_ms_per_step"] == 0 for r in res.rows if r["mode"] == "free")
    res.write(tmp_path / "s.json", tmp_path / "s.png")
    assert len(json.loads((tmp_path / "s.json").read_text())) == 6 and (tmp_path / "s.png").stat().st_size > 0
