"""`lessserve bench <name>`: benchmark programs (print a table, write JSON with --json)."""

from __future__ import annotations

from lessserve.cluster.commands.common import register_group

BENCH_MODULES = ["bench_decode", "bench_kernels", "bench_offload", "bench_serve"]


def register(sub) -> None:
    register_group(sub, "bench", "benchmarks (table + JSON)", BENCH_MODULES)
