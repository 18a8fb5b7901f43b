"""Prometheus text exposition for the cluster: histograms, counters and gauges, no client lib; and
`MetricsSink`, what the router records (the cluster-state actor in a cluster, memory in tests)."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Protocol

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = self.counts or [0] * (len(self.buckets) + 1)

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.total += v
        self.n += 1

    def render(self, name: str, help_: str) -> list[str]:
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts, strict=False):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return out


def render_metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> list[str]:
    out = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    for labels, v in samples:
        lab = ",".join(f'{k}="{val}"' for k, val in sorted(labels.items()))
        out.append(f"{name}{{{lab}}} {v}" if lab else f"{name} {v}")
    return out


class TokenTimer:
    """TTFT and inter-token gaps of one streamed turn (the cluster's histograms, the benches)."""

    def __init__(self, t0: float):
        self.t0, self.ttft, self.last, self.itls = t0, None, None, []

    def tick(self) -> None:
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.t0
        else:
            self.itls.append(now - self.last)
        self.last = now


class MetricsSink(Protocol):
    """Fire-and-forget records (never fail a response), and the exposition for /metrics."""

    def record_request(self, ttft: float | None, itls: list[float], tokens_out: int, prefilled: int) -> None: ...

    def record_error(self, status: int) -> None: ...

    def record_retry(self) -> None: ...

    async def prometheus(self) -> str: ...
