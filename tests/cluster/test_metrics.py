"""/metrics as a unit (no Ray): the cluster state's exposition, written by prometheus_client, keeps every
metric name, type and label of the hand-written one it replaced (recorded below from that code, so
dashboards keep working), and its numbers are the state's and the sums of the workers' reports."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lessserve.cluster.metrics import LATENCY_BUCKETS
from lessserve.cluster.state import ClusterState

# name -> (type, label names) of every family the hand-written exposition wrote (rendered once from it,
# at af930fa, with every counter touched and one worker reporting every tier number)
CONTRACT = {
    "lessserve_ttft_seconds": ("histogram", ("le",)),
    "lessserve_inter_token_latency_seconds": ("histogram", ("le",)),
    "lessserve_turns_total": ("counter", ()),
    "lessserve_tokens_out_total": ("counter", ()),
    "lessserve_tokens_prefilled_total": ("counter", ()),
    "lessserve_errors_4xx_total": ("counter", ()),
    "lessserve_errors_5xx_total": ("counter", ()),
    "lessserve_errors_503_total": ("counter", ()),
    "lessserve_errors_500_total": ("counter", ()),
    "lessserve_turn_retries_total": ("counter", ()),
    "lessserve_tokens_per_second": ("gauge", ()),
    "lessserve_tier_sessions": ("gauge", ("tier",)),
    "lessserve_tier_bytes": ("gauge", ("tier",)),
    "lessserve_tier_hits_total": ("counter", ("tier",)),
    "lessserve_tier_misses_total": ("counter", ("tier",)),
    "lessserve_tier_restores_total": ("counter", ("tier",)),
    "lessserve_tier_recomputes_total": ("counter", ("tier",)),
    "lessserve_tier_offloaded_bytes_total": ("counter", ("tier",)),
    "lessserve_turns_running": ("gauge", ()),
    "lessserve_turns_waiting": ("gauge", ()),
    "lessserve_turn_waits_total": ("counter", ()),
    "lessserve_turn_wait_seconds_total": ("counter", ()),
    "lessserve_turn_rejections_total": ("counter", ()),
    "lessserve_directory_writes_pending": ("gauge", ()),
    "lessserve_queue_depth": ("gauge", ()),
    "lessserve_workers": ("gauge", ()),
}
# added since: the state actor's shared map (the shared state without Redis) and its byte cap
ADDED = {
    "lessserve_state_kv_bytes": ("gauge", ()),
    "lessserve_state_kv_keys": ("gauge", ()),
    "lessserve_state_kv_evicted_bytes_total": ("counter", ()),
    "lessserve_state_kv_refused_writes_total": ("counter", ()),
}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}
TIERS = {"device": {"sessions": 2, "bytes": 100, "hits": 1, "misses": 0, "restores": 0, "recomputes": 0},
         "host": {"sessions": 1, "bytes": 50, "hits": 0, "misses": 1, "restores": 1, "recomputes": 0,
                  "offloaded_bytes": 9},
         "shared": {"sessions": None, "bytes": None, "hits": 0, "misses": 0, "restores": 0, "recomputes": 0,
                    "error": "down"},  # a tier whose backend is down
         "total": {"recomputes": 0, "dropped": 0, "transcript_write_failures": 0}}


def report(queue_depth=0, pending=0, running=0, waits=0, tiers=None) -> dict:
    return {"queue_depth": queue_depth, "directory_pending": pending, "tiers": tiers or {},
            "admission": {"running": running, "waiting": 0, "waits_total": waits, "wait_seconds_total": 0.5,
                          "rejected_total": 1}}


@pytest.fixture
def state():
    s = ClusterState.__ray_actor_class__()  # the actor's class itself, in this process
    s.record_request(0.2, [0.01, 0.02], 5, 7)
    s.record_request(None, [], 0, 0)
    s.record_retry()
    for status in (503, 500, 404):
        s.record_error(status)
    s.report_worker("w1", report(queue_depth=2, pending=1, running=1, waits=3, tiers=TIERS))
    s.report_worker("w2", report(queue_depth=1, waits=2, tiers={"device": {"sessions": 3, "hits": 4}}))
    return s


def families(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, label names) from the `# TYPE` lines and the samples under them."""
    out, labels, current = {}, {}, None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, current, kind = line.split()
            out[current], labels[current] = kind, set()
        elif line and not line.startswith("#"):
            name = line.split("{")[0].split()[0]
            assert any(name == current + s for s in SUFFIXES[out[current]]), (current, line)
            if "{" in line:
                labels[current] |= {kv.split("=")[0] for kv in line.split("{")[1].split("}")[0].split(",")}
    return {n: (k, tuple(sorted(labels[n]))) for n, k in out.items()}


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_names_types_and_labels_are_the_old_exposition_s(state):
    assert families(state.prometheus()) == {**CONTRACT, **ADDED}


def test_numbers_are_the_state_s_and_the_workers_sums(state):
    text = state.prometheus()
    got = samples(text)
    assert got["lessserve_turns_total"] == 2 and got["lessserve_tokens_out_total"] == 5
    assert got["lessserve_tokens_prefilled_total"] == 7 and got["lessserve_turn_retries_total"] == 1
    assert (got["lessserve_errors_5xx_total"], got["lessserve_errors_503_total"], got["lessserve_errors_4xx_total"]) \
        == (2, 1, 1)
    assert got['lessserve_ttft_seconds_bucket{le="0.1"}'] == 0 and got['lessserve_ttft_seconds_bucket{le="0.25"}'] == 1
    assert got['lessserve_ttft_seconds_bucket{le="+Inf"}'] == got["lessserve_ttft_seconds_count"] == 1
    assert got["lessserve_ttft_seconds_sum"] == pytest.approx(0.2)
    assert [got[f'lessserve_inter_token_latency_seconds_bucket{{le="{b}"}}'] for b in LATENCY_BUCKETS[:3]] == [0, 1, 2]
    assert got["lessserve_inter_token_latency_seconds_sum"] == pytest.approx(0.03)
    assert got['lessserve_tier_sessions{tier="device"}'] == 5 and got['lessserve_tier_hits_total{tier="device"}'] == 5
    assert got['lessserve_tier_bytes{tier="host"}'] == 50
    assert 'lessserve_tier_sessions{tier="shared"}' not in got  # down: no number rather than a false 0
    assert got['lessserve_tier_misses_total{tier="shared"}'] == 0
    assert got['lessserve_tier_recomputes_total{tier="total"}'] == 0
    assert got["lessserve_turns_running"] == 1 and got["lessserve_turn_waits_total"] == 5
    assert got["lessserve_turn_wait_seconds_total"] == 1.0 and got["lessserve_turn_rejections_total"] == 2
    assert got["lessserve_directory_writes_pending"] == 1 and got["lessserve_queue_depth"] == 3
    assert got["lessserve_workers"] == 2 and got["lessserve_tokens_per_second"] > 0
    assert {f.name for f in text_string_to_metric_families(text)}  # a Prometheus parser reads it


def test_a_worker_silent_past_the_staleness_limit_no_longer_counts(state, monkeypatch):
    """A worker killed without leaving stops reporting: after REPORT_STALE_S its numbers (a turn it was
    running, its sessions) leave /metrics, and it no longer counts as live."""
    import time as _time

    from lessserve.cluster import state as state_mod

    state.workers["w1"]["t"] -= state_mod.REPORT_STALE_S + 1  # w1 went silent a while ago
    got = samples(state.prometheus())
    assert got["lessserve_workers"] == 1 and got["lessserve_turns_running"] == 0 and got["lessserve_queue_depth"] == 1
    assert got['lessserve_tier_sessions{tier="device"}'] == 3 and "w1" not in state.workers
    assert _time.time() - state.workers["w2"]["t"] < 5


def test_the_state_maps_bytes_evictions_and_refusals_are_exported():
    from lessserve.cache_store.kv import KVFullError, KVMap
    from lessserve.cache_store.shared_tier import cache_keys

    s = ClusterState.__ray_actor_class__(max_bytes=1 << 20, cache_prefix="p")
    assert isinstance(s.kv, KVMap) and s.kv.max_bytes == 1 << 20
    s.kv_set("p:s:" + "a" * 16 + ":0", b"c" * (600 << 10), None)
    s.kv_set("p:s:ts", b"t" * (300 << 10), None)
    s.kv_set("lessserve:resp:r", b"r" * (300 << 10), None)  # the copy goes for it
    with pytest.raises(KVFullError):
        s.kv_set("lessserve:resp:q", b"r" * (600 << 10), None)
    got = samples(s.prometheus())
    assert got["lessserve_state_kv_bytes"] == 600 << 10 and got["lessserve_state_kv_keys"] == 2
    assert got["lessserve_state_kv_evicted_bytes_total"] == 600 << 10
    assert got["lessserve_state_kv_refused_writes_total"] == 1
    assert cache_keys("p")("p:s:ptr")


def test_a_fresh_state_has_no_tier_families_yet():
    text = ClusterState.__ray_actor_class__().prometheus()
    assert {n: k for n, (k, _) in families(text).items()} == {
        n: k for n, (k, _) in {**CONTRACT, **ADDED}.items() if not n.startswith("lessserve_tier_")}
    assert samples(text)["lessserve_workers"] == 0
