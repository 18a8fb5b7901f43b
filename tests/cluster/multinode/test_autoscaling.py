"""Ray's real autoscaler (the one KubeRay runs in its head pod) over the fake multi-node provider,
which starts and stops nodes as local processes: rising load makes Serve ask for a worker replica
that fits no node, the autoscaler launches one, new sessions land there; when load falls the
replica drains to Redis and the autoscaler removes the idle node; every conversation then goes on
with its cache restored (cached tokens > 0), none lost. Timings are printed as CLUSTER-TABLE rows."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import time

import psutil
import pytest

from lessserve.testing.local_redis import LocalRedis, free_port
from tests.cluster.multinode.conftest import deploy_and_wait, multinode_config
from tests.cluster.multinode.test_nodes import Chat

pytestmark = [pytest.mark.multinode, pytest.mark.long]
STORE = 150 * 2**20


def autoscaler_config(gcs_address: str, idle_minutes: float) -> dict:
    return {
        "cluster_name": "lessserve-test", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "disable_launch_config_check": True,
                     "disable_node_updaters": True, "use_node_id_as_ip": True},
        "auth": {"ssh_user": "ray"}, "docker": {}, "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1, "head": 1}, "node_config": {}, "max_workers": 0},
            "worker": {"resources": {"CPU": 1, "worker_node": 1, "object_store_memory": STORE}, "node_config": {},
                       "min_workers": 0, "max_workers": 2}},
        **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                           "setup_commands", "head_setup_commands", "worker_setup_commands",
                           "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


def kill_fake_nodes(node_ids: set[str]) -> None:
    """Processes of nodes the autoscaler started and had not removed yet (found by the node id the
    fake provider gives them), ended by PID."""
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") in node_ids:
                p.kill()
        except psutil.Error:
            continue


@pytest.fixture
def autoscaling(tmp_path, monkeypatch):
    import ray
    import ray._private.services as services
    from ray import serve
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
    gcs_port = free_port()
    path = tmp_path / "autoscaler.json"
    path.write_text(json.dumps(autoscaler_config(f"{services.get_node_ip_address()}:{gcs_port}", 0.25)))
    redis = LocalRedis().start()
    c = Cluster(initialize_head=True, head_node_args={"gcs_server_port": gcs_port, "num_cpus": 1,
                                                      "resources": {"head": 1}, "object_store_memory": STORE,
                                                      "autoscaling_config": str(path)})
    ray.init(address=c.address, log_to_driver=False, logging_level="WARNING", namespace="lessserve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly",
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    seen: set[str] = set()
    try:
        yield {"url": f"http://127.0.0.1:{port}", "redis": redis, "seen": seen}
    finally:
        seen |= {n["NodeID"] for n in ray.nodes()}
        serve.shutdown()
        ray.shutdown()
        c.shutdown()
        kill_fake_nodes(seen)
        redis.stop()
        assert os.environ.get("RAY_FAKE_CLUSTER") == "1"


def alive_worker_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("worker_node")]


def wait(cond, timeout: float, what: str):
    import ray
    from ray import serve

    end = time.time() + timeout
    while time.time() < end:
        if got := cond():
            return got
        time.sleep(1)
    app = serve.status().applications.get("lessserve")
    states = {n: d.replica_states for n, d in app.deployments.items()} if app else None
    nodes = [(n["NodeID"][:8], n["Alive"], n["Resources"], n.get("ResourcesUsed")) for n in ray.nodes()]
    raise TimeoutError(f"{what}: replicas {states}; nodes {nodes}; available {ray.available_resources()}")


def test_nodes_join_under_load_and_leave_when_idle_no_session_lost(autoscaling):
    url, rows = autoscaling["url"], []
    cfg = multinode_config(autoscaling["redis"].url, int(url.rsplit(":", 1)[1]), workers=1)
    cfg["workers"] = {"min_workers": 1, "max_workers": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
                      "downscale_delay_s": 5}
    cfg.update(drain_timeout_s=20, max_tokens_limit=512)
    t0 = time.time()
    deploy_and_wait(cfg, timeout=400)  # the first worker replica needs a node: the autoscaler adds it
    rows.append(("first node launched, replica up, app running", time.time() - t0))
    first_node = wait(alive_worker_nodes, 60, "a worker node")[0]
    autoscaling["seen"].add(first_node)

    chats = [Chat(url, "test-key-a") for _ in range(4)]
    t0 = time.time()
    with cf.ThreadPoolExecutor(4) as pool:  # 4 long turns at once: Serve wants 2 replicas
        futs = [pool.submit(c.turn, "Write a long story about a lighthouse.", 120) for c in chats]
        second = wait(lambda: [n for n in alive_worker_nodes() if n != first_node], 300, "a second node")[0]
        rows.append(("load -> second node joined", time.time() - t0))
        autoscaling["seen"].add(second)
        for f in futs:
            f.result(timeout=600)
    late = []
    t1 = time.time()
    while time.time() - t1 < 240 and not any(c.info().get("node") == second for c in late):
        late.append(Chat(url, "test-key-a"))  # new sessions, until one lands on the new node
        late[-1].turn("Name a colour.")
    on_second = [c for c in [*chats, *late] if c.info()["node"] == second]
    assert on_second, "no session landed on the new node"
    rows.append(("second replica serving (sessions there)", time.time() - t0))

    t0 = time.time()  # load gone: Serve scales down, the replica drains, the node goes idle and goes
    wait(lambda: len(alive_worker_nodes()) == 1, 400, "an idle node removed")
    rows.append(("load stops -> replica drained and idle node removed", time.time() - t0))
    for c in [*chats, *late]:
        body = c.turn("Thanks! One more sentence?", 8)
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, (c.sid, body["usage"])
        assert c.info()["turns"] == 2
    for what, s in rows:
        print(f"\nCLUSTER-TABLE | {what} | {s:.1f} s |")
    print(f"CLUSTER-TABLE | sessions: {len(chats) + len(late)}, on the node that left: {len(on_second)}, "
          "lost: 0, turns failed: 0 |")
