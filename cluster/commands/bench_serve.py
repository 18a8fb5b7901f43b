"""`lessserve bench serve`: multi-turn chat load against (a) session caches with LESS and tiers and
(b) the same cluster with the full policy and no session cache; one run, same machine."""

from __future__ import annotations

from lessserve.cluster.commands.common import CliError, in_range


def register(bsub) -> None:
    p = bsub.add_parser("serve", help="multi-turn chat load: session caches vs recompute")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.5, help="user arrivals per second (Poisson)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--policy", default="h2o+less", help="policy of configuration (a)")
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--time-limit", type=float, default=600, help="seconds per configuration, at most")
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    for flag, v, lo, hi in (("--users", args.users, 1, 256), ("--turns", args.turns, 1, 64),
                            ("--max-tokens", args.max_tokens, 1, 1024), ("--port", args.port, 1024, 65535),
                            ("--time-limit", args.time_limit, 1, 3600)):
        in_range(flag, v, lo, hi)
    if not 0 < args.rate <= 100:
        raise CliError("--rate", "must be in (0, 100]")
    import asyncio

    from lessserve.cluster import launch
    from lessserve.cluster.bench_serve import run_load
    from lessserve.cluster.config import load_config
    from lessserve.workers.report import markdown_table, progress, write_json

    configs = [
        ("sessions " + args.policy, {"engine.policy": args.policy, "engine.budget": args.budget}, True),
        ("no session cache (full)", {"engine.policy": "full", "engine.max_context": 4096}, False),
    ]
    rows = []
    for name, over, sessions in configs:
        cfg = load_config(overrides={**over, "port": args.port, "engine.max_slots": args.users + 2,
                                     "worker_num_cpus": 1, "router_num_cpus": 0.1})
        progress(f"== {name}: starting the cluster ...")
        launch.start(cfg)
        try:
            res = asyncio.run(run_load(f"http://127.0.0.1:{args.port}", cfg.model_name, args.users, args.turns,
                                       args.rate, args.max_tokens, sessions, args.seed, args.time_limit,
                                       tag=name.split()[0]))
        finally:
            launch.stop()
        rows.append({"config": name, "sessions": args.users if sessions else 0, **res})
        progress(f"== {name}: {res['turns']} turns, {res['turns_per_s']:.3f} turns/s, "
                 f"ttft p50 {res['ttft_p50_s']:.2f}s p99 {res['ttft_p99_s']:.2f}s")
    a, b = rows
    a["turns_per_s_ratio_vs_recompute"] = a["turns_per_s"] / b["turns_per_s"] if b["turns_per_s"] else float("nan")
    a["ttft_p99_ratio_vs_recompute"] = b["ttft_p99_s"] / a["ttft_p99_s"] if a["ttft_p99_s"] else float("nan")
    cols = ["config", "turns", "turns_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "sessions",
            "errors"]
    print(markdown_table(rows, cols))
    print(f"turns/s ratio (a)/(b): {a['turns_per_s_ratio_vs_recompute']:.2f}; "
          f"p99 TTFT ratio (b)/(a): {a['ttft_p99_ratio_vs_recompute']:.2f}")
    write_json(args.json, rows)
    return 0
