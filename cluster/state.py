"""Cluster-wide state in one named Ray actor: each worker's latest stats, request latency
histograms and counters, and the cluster's shared key-value map (ActorKV, cluster/actor_kv.py):
the session directory, Responses records, transcripts and the shared cache tier when no Redis
is configured, with TTL expiry and byte accounting (cache_store.kv.KVMap)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import ray

from lessserve.cache_store.kv import KEYS_LIMIT, KVMap
from lessserve.cluster.metrics import Histogram, render_metric

STATE_ACTOR = "lessserve-cluster-state"
NAMESPACE = "lessserve"
HEAD_RESOURCE = "node:__internal_head__"  # Ray gives it to the head node only


@ray.remote(num_cpus=0)
class ClusterState:
    def __init__(self):
        self.kv = KVMap()
        self.workers: dict[str, dict] = {}  # worker id -> latest stats + "t"
        self.ttft = Histogram()
        self.itl = Histogram()
        self.counters = {"turns": 0, "tokens_out": 0, "tokens_prefilled": 0, "errors_4xx": 0, "errors_5xx": 0,
                         "errors_503": 0, "errors_500": 0, "turn_retries": 0}
        self.t0 = time.time()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    # the shared key-value map (each call atomic: the actor runs one at a time)
    def kv_get(self, key: str) -> bytes | None:
        return self.kv.get(key)

    def kv_get_many(self, keys: list[str]) -> list[bytes | None]:
        return self.kv.get_many(keys)

    def kv_set(self, key: str, value: bytes, ttl_s: float | None) -> None:
        self.kv.set(key, value, ttl_s)

    def kv_set_many(self, items: Mapping[str, bytes], ttl_s: float | None) -> None:
        self.kv.set_many(items, ttl_s)

    def kv_swap(self, key: str, value: bytes, ttl_s: float | None) -> bytes | None:
        return self.kv.swap(key, value, ttl_s)

    def kv_pop(self, key: str) -> bytes | None:
        return self.kv.pop(key)

    def kv_delete(self, keys: list[str]) -> int:
        return self.kv.delete(*keys)

    def kv_exists(self, key: str) -> bool:
        return self.kv.exists(key)

    def kv_keys(self, prefix: str = "", suffix: str = "", limit: int = KEYS_LIMIT) -> list[str]:
        return self.kv.keys(prefix, suffix, limit)

    def kv_used(self, prefix: str = "") -> tuple[int, int]:
        return self.kv.used(prefix)

    def kv_cap(self, prefix: str, max_keys: int) -> None:
        self.kv.cap(prefix, max_keys)

    def kv_epoch(self) -> str:
        return self.kv.epoch

    def worker_left(self, worker: str) -> None:
        """A worker drained and left: it no longer counts in the metrics."""
        self.workers.pop(worker, None)

    # metrics
    def live_workers(self, stale_s: float) -> int:
        """Workers that reported within the last `stale_s` seconds."""
        now = time.time()
        return sum(1 for w in self.workers.values() if now - w["t"] <= stale_s)

    def report_worker(self, worker: str, stats: dict) -> None:
        self.workers[worker] = {**stats, "t": time.time()}

    def record_request(self, ttft: float | None, itls: list[float], tokens_out: int, prefilled: int) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
        for x in itls:
            self.itl.observe(x)
        self.counters["turns"] += 1
        self.counters["tokens_out"] += tokens_out
        self.counters["tokens_prefilled"] += prefilled

    def record_retry(self) -> None:
        """The router re-ran a turn on another worker (its worker died before the first token)."""
        self.counters["turn_retries"] += 1

    def record_error(self, status: int) -> None:
        self.counters["errors_5xx" if status >= 500 else "errors_4xx"] += 1
        if status in (500, 503):
            self.counters[f"errors_{status}"] += 1

    def prometheus(self, queue_depth: int = 0) -> str:
        up = max(time.time() - self.t0, 1e-9)
        lines = self.ttft.render("lessserve_ttft_seconds", "Time to first token")
        lines += self.itl.render("lessserve_inter_token_latency_seconds", "Time between streamed tokens")
        for k, v in self.counters.items():
            lines += render_metric(f"lessserve_{k}_total", "counter", k.replace("_", " "), [({}, v)])
        lines += render_metric("lessserve_tokens_per_second", "gauge", "Generated tokens per second since start",
                               [({}, self.counters["tokens_out"] / up)])
        tiers: dict[str, dict] = {}
        for w in self.workers.values():
            for tier, st in (w.get("tiers") or {}).items():
                agg = tiers.setdefault(tier, {})
                for k, v in st.items():
                    if isinstance(v, (int, float)):
                        agg[k] = agg.get(k, 0) + v
        for key, name in (("sessions", "sessions"), ("bytes", "bytes"), ("hits", "hits_total"),
                          ("misses", "misses_total"), ("restores", "restores_total"),
                          ("recomputes", "recomputes_total"), ("offloaded_bytes", "offloaded_bytes_total")):
            samples = [({"tier": t}, st[key]) for t, st in sorted(tiers.items()) if key in st]
            if samples:
                lines += render_metric(f"lessserve_tier_{name}", "gauge" if key in ("sessions", "bytes")
                                       else "counter", f"Per-tier {key}", samples)
        adm = {k: sum((w.get("admission") or {}).get(k, 0) for w in self.workers.values())
               for k in ("running", "waiting", "waits_total", "wait_seconds_total", "rejected_total")}
        lines += render_metric("lessserve_turns_running", "gauge", "Turns holding a session slot",
                               [({}, adm["running"])])
        lines += render_metric("lessserve_turns_waiting", "gauge", "Turns waiting for a session slot",
                               [({}, adm["waiting"])])
        lines += render_metric("lessserve_turn_waits_total", "counter", "Turns that waited for a slot",
                               [({}, adm["waits_total"])])
        lines += render_metric("lessserve_turn_wait_seconds_total", "counter", "Seconds turns waited for a slot",
                               [({}, adm["wait_seconds_total"])])
        lines += render_metric("lessserve_turn_rejections_total", "counter", "Turns refused with 503 (queue full "
                               "or wait too long)", [({}, adm["rejected_total"])])
        pending = sum(int(w.get("directory_pending", 0)) for w in self.workers.values())
        lines += render_metric("lessserve_directory_writes_pending", "gauge", "Directory writes kept back by an "
                               "outage", [({}, pending)])
        queue = sum(int(w.get("queue_depth", 0)) for w in self.workers.values()) + queue_depth
        lines += render_metric("lessserve_queue_depth", "gauge", "Turns waiting or running on workers",
                               [({}, queue)])
        lines += render_metric("lessserve_workers", "gauge", "Live workers", [({}, len(self.workers))])
        return "\n".join(lines) + "\n"


def get_state():
    """The cluster's state actor, created on first use (detached so routers can restart), on the
    head node: a worker node that goes away must not take the directory and the metrics with it
    (placed by Ray's choice, it once sat on the node a test removed, and /metrics failed after)."""
    return ClusterState.options(name=STATE_ACTOR, namespace=NAMESPACE, get_if_exists=True,
                                lifetime="detached", resources={HEAD_RESOURCE: 0.001}).remote()
