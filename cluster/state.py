"""Cluster-wide state in one named Ray actor: the session directory (when no Redis), each
worker's latest stats, request latency histograms, and the in-cluster shared tier (bytes by
key) used to move sessions between workers when no Redis is configured."""

from __future__ import annotations

import time
from collections import OrderedDict

import ray

from lessserve.cluster.metrics import Histogram, cluster_registry, exposition

STATE_ACTOR = "lessserve-cluster-state"
NAMESPACE = "lessserve"


def merged_entry(old: dict | None, worker: str | None, owner: str | None, turns: int | None,
                 if_newer: bool) -> dict | None:
    """A session's directory entry after `worker` claims it: {"worker", "owner", "turns", "t"}.
    The owner never changes once set. `if_newer` (a re-publish after the backend lost its contents)
    claims only when no entry records more turns: a worker holding a stale copy never wins over
    the one that served the latest turn. None: the claim was refused."""
    e = dict(old or {"worker": None, "owner": owner})
    if if_newer and old and turns is not None and (old.get("turns") or 0) > turns:
        return None
    if worker is not None:
        e["worker"] = worker
    if owner is not None and e.get("owner") is None:
        e["owner"] = owner
    if turns is not None:
        e["turns"] = turns
    e["t"] = time.time()
    return e


HEAD_RESOURCE = "node:__internal_head__"  # Ray gives it to the head node only


@ray.remote(num_cpus=0)
class ClusterState:
    def __init__(self):
        self.directory: dict[str, dict] = {}  # session -> {"worker", "owner", "t"}
        self.workers: dict[str, dict] = {}  # worker id -> latest stats + "t"
        self.blobs: dict[str, bytes] = {}
        self.responses: OrderedDict[str, tuple[float, str]] = OrderedDict()  # id -> (expiry, record JSON)
        self.ttft = Histogram()
        self.itl = Histogram()
        self.counters = {"turns": 0, "tokens_out": 0, "tokens_prefilled": 0, "errors_4xx": 0, "errors_5xx": 0,
                         "errors_503": 0, "errors_500": 0, "turn_retries": 0}
        self.t0 = time.time()
        self.registry = cluster_registry(self)

    def started_at(self) -> float:
        return self.t0

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    # directory
    def lookup(self, sid: str) -> dict | None:
        return self.directory.get(sid)

    def place(self, sid: str, worker: str | None = None, owner: str | None = None, turns: int | None = None,
              if_newer: bool = False) -> dict | None:
        e = merged_entry(self.directory.get(sid), worker, owner, turns, if_newer)
        if e is not None:
            self.directory[sid] = e
        return e

    def forget(self, sid: str) -> None:
        self.directory.pop(sid, None)

    def leave(self, worker: str) -> int:
        """A worker left (drained): its sessions now live only in the shared tier."""
        n = 0
        for e in self.directory.values():
            if e.get("worker") == worker:
                e["worker"], n = None, n + 1
        self.workers.pop(worker, None)
        return n

    # response records (no Redis): bounded by a TTL and a count, oldest first out
    def response_put(self, rid: str, rec: str, ttl_s: float, max_records: int) -> None:
        self.responses[rid] = (time.time() + ttl_s, rec)
        self.responses.move_to_end(rid)
        while len(self.responses) > max_records:
            self.responses.popitem(last=False)

    def response_get(self, rid: str) -> str | None:
        got = self.responses.get(rid)
        if got is None or got[0] < time.time():
            self.responses.pop(rid, None)
            return None
        return got[1]

    def response_delete(self, rid: str) -> bool:
        return self.responses.pop(rid, None) is not None

    # shared tier (no Redis)
    def blob_put(self, key: str, value: bytes) -> None:
        self.blobs[key] = value

    def blob_get(self, key: str) -> bytes | None:
        return self.blobs.get(key)

    def blob_delete(self, key: str) -> bool:
        return self.blobs.pop(key, None) is not None

    def blob_keys(self) -> list[str]:
        return list(self.blobs)

    def blob_bytes(self, prefix: str = "") -> int:
        return sum(len(v) for k, v in self.blobs.items() if k.startswith(prefix))

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

    def prometheus(self) -> str:
        return exposition(self.registry)


def get_state():
    """The cluster's state actor, created on first use (detached so routers can restart), on the
    head node: a worker node that goes away must not take the directory and the metrics with it
    (placed by Ray's choice, it once sat on the node a test removed, and /metrics failed after)."""
    return ClusterState.options(name=STATE_ACTOR, namespace=NAMESPACE, get_if_exists=True,
                                lifetime="detached", resources={HEAD_RESOURCE: 0.001}).remote()
