"""The prepared GPU run dry-runs on CPU (detects no GPU, says so, exits 0 after the CPU-side stages);
its random-weight decode / serve stages and the roofline plan run on CPU at toy sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what happens without a GPU")
def test_gpu_script_dry_runs_on_cpu(tmp_path):
    env = dict(os.environ, STAGES="probe,plan,tests,kernels,decode,serve", PY=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "NO CUDA GPU" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["name"]: (s["status"], s["note"]) for s in summary["stages"]}
    assert status["plan"][0] == "ok"
    for name in ("tests", "kernels", "decode", "serve"):
        assert status[name] == ("skipped", "no CUDA GPU")
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# GPU run: none: NO CUDA GPU") and "## plan" in md
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {r["model"] for r in plan} == {"llama2-7b", "llama3-8b", "smollm2-135m"}
    assert {r["batch"] for r in plan} == {1, 8, 32, 128}


def test_stage_time_limits_fit_the_budget():
    from lessserve.bench.gpu_run import BUDGET_S, LIMITS, ON_REQUEST, STAGES

    assert BUDGET_S <= 480 and set(LIMITS) == set(STAGES) | set(ON_REQUEST)
    assert sum(LIMITS[k] for k in STAGES if k != "probe") <= BUDGET_S  # the default run
    assert all(LIMITS[k] <= BUDGET_S for k in ON_REQUEST)  # a stage asked for on its own


def test_plan_bytes():
    """decode at llama3-8b, batch 32, budget 2048: K and V of 32 x 8 heads x 2048 x 128 in bf16."""
    from lessserve.bench.roofline import attention_bytes, plan_row

    b = attention_bytes(32, 32, 8, 128, 2048, 1)
    assert b["read"] >= 2 * 32 * 8 * 2048 * 128 * 2
    row = plan_row("decode", "llama3-8b", 32, 2048, 4.8e12, 132)
    assert row["programs"] == 32 * 8 and row["bound"] == "bandwidth"
    assert row["t_min_us"] == pytest.approx((b["read"] + b["written"]) / 4.8e12 * 1e6)
    assert plan_row("decode", "smollm2-135m", 1, 128, 4.8e12, 132)["bound"] == "latency"


TOY = (128, 64, 128, 2, 4, 2, 16, 10000.0)  # vocab, hidden, intermediate, layers, q / kv heads, head_dim, theta


def test_random_decode_and_serve_run(monkeypatch):
    from lessserve.bench import random_models
    from lessserve.bench.random_load import run_random_decode, run_random_serve

    monkeypatch.setitem(random_models.SHAPES, "toy", TOY)
    dec = run_random_decode(["toy"], [1, 3], context=40, steps=2, budget=16)
    assert [r["batch"] for r in dec.rows] == [1, 3] and all(r["tokens_per_s"] > 0 for r in dec.rows)
    srv = run_random_serve(["toy"], users=3, turns=2, new_tokens=8, max_tokens=4, budget=16)
    (row,) = srv.rows
    assert row["turns"] == 6 and row["ttft_p50_s"] > 0 and row["itl_p50_s"] > 0


def test_random_recall_times_both_policies_and_the_scoring(monkeypatch):
    """The GPU part of issue 27 at toy sizes: per history and turn, h2o and h2o+recall, the ratio, and
    the round's page scoring (a part of its TTFT)."""
    from lessserve.bench import random_models
    from lessserve.bench.random_load import run_random_recall

    monkeypatch.setitem(random_models.SHAPES, "toy", TOY)
    res = run_random_recall(["toy"], [192, 320], turn_tokens=(5, 40), repeats=1)
    got = {(r["policy"], r["history"], r["turn_tokens"]) for r in res.rows}
    assert got == {(p, h, t) for p in ("h2o", "h2o+recall") for h in (192, 320) for t in (5, 40)}
    for r in res.rows:
        if r["policy"] == "h2o+recall":
            assert 0 < r["score_ms"] < r["ttft_ms"] and r["x_without"] > 0
    assert res.meta["weights"] == "random (shapes only)"
