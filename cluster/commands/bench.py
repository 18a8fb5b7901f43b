"""`lessserve bench <name>`: benchmark programs (print a table, write JSON with --json)."""

from __future__ import annotations

import importlib

# Each module in lessserve.cluster.commands exposes register(bench_subparsers).
BENCH_MODULES = ["bench_decode", "bench_kernels", "bench_offload", "bench_serve"]


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (table + JSON)")
    bsub = p.add_subparsers(dest="bench", required=True)
    for name in BENCH_MODULES:
        try:
            mod = importlib.import_module(f"lessserve.cluster.commands.{name}")
        except ModuleNotFoundError as e:  # a benchmark whose module is not written yet
            if e.name != f"lessserve.cluster.commands.{name}":
                raise
            continue
        mod.register(bsub)
