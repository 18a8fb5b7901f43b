"""`lessserve bench serve`: the same multi-turn chat load against (a) the cluster with session
caches (LESS and tiers) and (b) the cluster with the full policy and no session cache; one run,
same machine, each configuration bounded in time."""

from __future__ import annotations

import asyncio

from lessserve.bench.result import BenchResult
from lessserve.bench.serve_load import run_load
from lessserve.lab.output import progress

COLUMNS = ["config", "turns", "turns_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "sessions",
           "errors"]


def run_serve(policy: str, budget: int, users: int, turns: int, rate: float, max_tokens: int, time_limit_s: float,
              port: int, seed: int) -> BenchResult:
    from lessserve.cluster import launch
    from lessserve.cluster.config import load_config

    configs = [
        ("sessions " + policy, {"engine.policy": policy, "engine.budget": budget}, True),
        ("no session cache (full)", {"engine.policy": "full", "engine.max_context": 4096}, False),
    ]
    rows = []
    for name, over, sessions in configs:
        cfg = load_config(overrides={**over, "port": port, "engine.max_slots": users + 2,
                                     "worker_num_cpus": 1, "router_num_cpus": 0.1})
        progress(f"== {name}: starting the cluster ...")
        launch.start(cfg)
        try:
            res = asyncio.run(run_load(f"http://127.0.0.1:{port}", cfg.model_name, users, turns, rate, max_tokens,
                                       sessions, seed, time_limit_s, tag=name.split()[0]))
        finally:
            launch.stop()
        rows.append({"config": name, "sessions": users if sessions else 0, **res})
        progress(f"== {name}: {res['turns']} turns, {res['turns_per_s']:.3f} turns/s, "
                 f"ttft p50 {res['ttft_p50_s']:.2f}s p99 {res['ttft_p99_s']:.2f}s")
    a, b = rows
    a["turns_per_s_ratio_vs_recompute"] = a["turns_per_s"] / b["turns_per_s"] if b["turns_per_s"] else float("nan")
    a["ttft_p99_ratio_vs_recompute"] = b["ttft_p99_s"] / a["ttft_p99_s"] if a["ttft_p99_s"] else float("nan")
    note = (f"turns/s ratio (a)/(b): {a['turns_per_s_ratio_vs_recompute']:.2f}; "
            f"p99 TTFT ratio (b)/(a): {a['ttft_p99_ratio_vs_recompute']:.2f}")
    return BenchResult("serve", rows, columns=COLUMNS, notes=[note])
