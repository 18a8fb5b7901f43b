"""The cluster's Prometheus metrics through prometheus_client: one collector reads the cluster state's
numbers at scrape time (its latency histograms and counters, the sums of the workers' latest
reports) and `generate_latest` writes the text exposition. TokenTimer times one streamed turn;
`MetricsSink` is what the router records (the cluster-state actor in a cluster, memory in tests)."""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# a tier's numbers in the workers' reports -> the name after "lessserve_tier_" (counters end in _total)
TIER_METRICS = (("sessions", "sessions"), ("bytes", "bytes"), ("hits", "hits_total"), ("misses", "misses_total"),
                ("restores", "restores_total"), ("recomputes", "recomputes_total"),
                ("offloaded_bytes", "offloaded_bytes_total"))
# the admission gates' numbers, summed over workers: (report key, metric name, help)
ADMISSION_METRICS = (
    ("running", "lessserve_turns_running", "Turns holding a session slot"),
    ("waiting", "lessserve_turns_waiting", "Turns waiting for a session slot"),
    ("waits_total", "lessserve_turn_waits_total", "Turns that waited for a slot"),
    ("wait_seconds_total", "lessserve_turn_wait_seconds_total", "Seconds turns waited for a slot"),
    ("rejected_total", "lessserve_turn_rejections_total", "Turns refused with 503 (queue full or wait too long)"),
)


@dataclass
class Histogram:
    """Observations counted per latency bucket (the last one is +Inf), kept by the state actor."""

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

    def family(self, name: str, help_: str) -> HistogramMetricFamily:
        cumulative = itertools.accumulate(self.counts[:-1])
        buckets = [(floatToGoString(b), c) for b, c in zip(self.buckets, cumulative, strict=True)]
        return HistogramMetricFamily(name, help_, buckets=[*buckets, ("+Inf", self.n)], sum_value=self.total)


class ClusterCollector:
    """A prometheus_client collector over a ClusterState's numbers: `ttft` and `itl` (Histogram),
    `counters` (name -> count), `t0` (start, epoch seconds) and `live_reports()` (the live workers'
    latest reports)."""

    def __init__(self, state):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        st, workers = self.state, self.state.live_reports()
        yield st.ttft.family("lessserve_ttft_seconds", "Time to first token")
        yield st.itl.family("lessserve_inter_token_latency_seconds", "Time between streamed tokens")
        for k, v in st.counters.items():
            yield CounterMetricFamily(f"lessserve_{k}_total", k.replace("_", " "), value=v)
        up = max(time.time() - st.t0, 1e-9)
        yield GaugeMetricFamily("lessserve_tokens_per_second", "Generated tokens per second since start",
                                value=st.counters["tokens_out"] / up)
        tiers: dict[str, dict] = {}
        for w in workers:
            for tier, numbers in (w.get("tiers") or {}).items():
                agg = tiers.setdefault(tier, {})
                for k, v in numbers.items():
                    if isinstance(v, (int, float)):  # a tier that is down reports None
                        agg[k] = agg.get(k, 0) + v
        for key, name in TIER_METRICS:
            kind = GaugeMetricFamily if key in ("sessions", "bytes") else CounterMetricFamily
            family = kind(f"lessserve_tier_{name}", f"Per-tier {key}", labels=["tier"])
            for tier, numbers in sorted(tiers.items()):
                if key in numbers:
                    family.add_metric([tier], numbers[key])
            if family.samples:
                yield family
        for key, name, help_ in ADMISSION_METRICS:
            kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
            yield kind(name, help_, value=sum((w.get("admission") or {}).get(key, 0) for w in workers))
        yield GaugeMetricFamily("lessserve_directory_writes_pending", "Directory writes kept back by an outage",
                                value=sum(int(w.get("directory_pending", 0)) for w in workers))
        yield GaugeMetricFamily("lessserve_queue_depth", "Turns waiting or running on workers",
                                value=sum(int(w.get("queue_depth", 0)) for w in workers))
        yield GaugeMetricFamily("lessserve_workers", "Live workers", value=len(workers))
        kv = getattr(st, "kv", None)  # the shared state the state actor keeps without Redis
        if kv is not None:
            yield GaugeMetricFamily("lessserve_state_kv_bytes", "Bytes of values in the state actor's shared map",
                                    value=kv.bytes)
            yield GaugeMetricFamily("lessserve_state_kv_keys", "Keys in the state actor's shared map", value=len(kv))
            yield CounterMetricFamily("lessserve_state_kv_evicted_bytes", "Cache copies evicted by the byte cap",
                                      value=kv.evicted_bytes)
            yield CounterMetricFamily("lessserve_state_kv_refused_writes", "Writes refused: the map was full of "
                                      "values it may not evict", value=kv.refused_writes)


def cluster_registry(state) -> CollectorRegistry:
    """A registry holding the cluster's metrics, read from `state` at every scrape."""
    registry = CollectorRegistry()
    registry.register(ClusterCollector(state))
    return registry


def exposition(registry: CollectorRegistry) -> str:
    """The Prometheus text format (0.0.4) of everything in `registry`."""
    return generate_latest(registry).decode()


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
