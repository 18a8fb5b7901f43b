"""`lessserve bench soak`, short: a real embedded cluster and a real redis-server killed and brought
back while users talk. No 5xx (503s only with Retry-After), RSS sampled per role, plot written."""

from __future__ import annotations

import json

from lessserve.testing.local_redis import free_port


def test_short_soak_with_redis_faults(tmp_path):
    from lessserve.bench.soak import run_soak

    res = run_soak(duration_s=24, users=2, turns=2, max_tokens=4, max_turns=10_000, port=free_port(), seed=0,
                   faults=True, fault_every_s=8, sample_s=2, warmup_s=4)
    s = res.summary[0]
    assert s["turns"] > 0 and s["http_5xx_not_503"] == 0 and s["http_4xx"] == 0, s
    assert any("redis killed" in n for n in res.notes), res.notes
    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    res.write(out, png)
    rows = json.loads(out.read_text())
    assert {r["process"] for r in rows} == {"router", "worker", "worker minus host tier"}
    assert all(r["rss_mb"] > 50 for r in rows if r["t_s"] > 4), rows[:6]
    assert png.stat().st_size > 1000
