"""Cluster-wide state in one named Ray actor: each worker's latest stats, request latency
histograms and counters, and the cluster's shared key-value map (ActorKV, cluster/actor_kv.py):
the session directory, Responses records, transcripts and the shared cache tier when no Redis
is configured, with TTL expiry and byte accounting (cache_store.kv.KVMap)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import ray

from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.kv import KEYS_LIMIT, KVMap
from lessserve.cache_store.shared_tier import cache_keys
from lessserve.cluster.metrics import Histogram, cluster_registry, exposition

STATE_ACTOR = "lessserve-cluster-state"
NAMESPACE = "lessserve"
HEAD_RESOURCE = "node:__internal_head__"  # Ray gives it to the head node only
REPORT_STALE_S = 60.0  # a worker reports every maintain_interval_s (5 s); silent this long, it is gone


@ray.remote(num_cpus=0)
class ClusterState:
    def __init__(self, max_bytes: int | None = None, cache_prefix: str = "lessserve:kv"):
        """`max_bytes`: the shared map's byte cap; the shared tier's cache copies under `cache_prefix`
        are what it may evict (KVMap)."""
        self.kv = KVMap(max_bytes=max_bytes, evictable=cache_keys(cache_prefix))
        self.workers: dict[str, dict] = {}  # worker id -> latest stats + "t"
        self.ttft = Histogram()
        self.itl = Histogram()
        self.counters = {"turns": 0, "tokens_out": 0, "tokens_prefilled": 0, "errors_4xx": 0, "errors_5xx": 0,
                         "errors_503": 0, "errors_500": 0, "turn_retries": 0}
        self.t0 = time.time()
        self.registry = cluster_registry(self)

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

    def kv_cas(self, key: str, expect: bytes | None, value: bytes, ttl_s: float | None) -> bool:
        return self.kv.cas(key, expect, value, ttl_s)

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

    def live_reports(self) -> list[dict]:
        """The latest report of every worker heard from within REPORT_STALE_S; older ones (a worker
        killed without leaving) are dropped, so /metrics never sums a dead worker's numbers."""
        now = time.time()
        for worker in [w for w, r in self.workers.items() if now - r["t"] > REPORT_STALE_S]:
            del self.workers[worker]
        return list(self.workers.values())

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

    def prometheus(self) -> str:
        return exposition(self.registry)


def get_state(store: StoreConfig | None = None):
    """The cluster's state actor, created on first use (detached so routers can restart), on the
    head node: a worker node that goes away must not take the directory and the metrics with it
    (placed by Ray's choice, it once sat on the node a test removed, and /metrics failed after).
    `store`: its shared map's byte cap and cache prefix, taken by whoever creates it first (every
    caller passes the application's one StoreConfig)."""
    store = store or StoreConfig()
    return ClusterState.options(name=STATE_ACTOR, namespace=NAMESPACE, get_if_exists=True,
                                lifetime="detached", resources={HEAD_RESOURCE: 0.001}).remote(
        store.state_max_bytes, store.redis_prefix)
