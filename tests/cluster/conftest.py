"""A real Ray Serve cluster on loopback: two CPU workers (fractional CPUs), a real Redis as the
shared tier and session directory, the real default model, API keys on.

One cluster serves the whole package. A test that needs another configuration deploys it
(`deploy`, or `faulty` in test_faults.py) and leaves it running; the next test that asks for
`cluster` gets the package's own configuration back first. Consecutive variants thus cost one
deploy each, not two (a deploy restarts every replica: about 20 s here, even for the same config)."""

from __future__ import annotations

import json
import os
import time

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from lessserve.testing.local_redis import LocalRedis, free_port  # noqa: E402

KEY_A, KEY_B = "test-key-a", "test-key-b"


def cluster_config(redis_url: str, port: int, workers: int = 2) -> dict:
    return {
        "engine": {"policy": "h2o", "budget": 48, "max_slots": 6, "prefill_chunk": 32},
        "store": {"redis_url": redis_url, "device_idle_s": None, "host_idle_s": None},
        "workers": {"min_workers": workers, "max_workers": workers},
        "host": "127.0.0.1", "port": port, "api_keys": [KEY_A, KEY_B],
        "router_num_cpus": 0.1, "worker_num_cpus": 0.5, "worker_num_gpus": 0,
        "max_tokens_limit": 512, "max_body_bytes": 200_000, "drain_timeout_s": 30, "maintain_interval_s": 1.0,
    }


_deployed: dict[str, str | None] = {"cfg": None}  # the configuration the running app was deployed with


def deploy(cfg: dict) -> None:
    """Run `cfg` as the app, unless it already runs (then only wait for its workers)."""
    from ray import serve

    from lessserve.cluster.app import build_app

    key = json.dumps(cfg, sort_keys=True)
    if _deployed["cfg"] != key:
        _deployed["cfg"] = None  # a deploy that fails half way leaves nothing known to run
        serve.run(build_app(cfg), name="lessserve", route_prefix="/", blocking=False)
        _deployed["cfg"] = key
    wait_workers(cfg["workers"]["min_workers"])


def wait_workers(n: int, timeout: float = 240.0) -> None:
    from ray import serve

    end = time.time() + timeout
    while time.time() < end:
        st = serve.status().applications.get("lessserve")
        if st and st.status == "RUNNING":
            d = st.deployments["LessWorker"]
            running = d.replica_states.get("RUNNING", 0)
            if running == n and sum(d.replica_states.values()) == n:
                return
        time.sleep(0.5)
    raise TimeoutError(f"workers did not reach {n}: {serve.status()}")


@pytest.fixture(scope="package")
def redis_server():
    server = LocalRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def serve_cluster(redis_server):
    """The package's cluster as it is: whatever configuration the last test deployed."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             namespace="lessserve", _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    cfg = cluster_config(redis_server.url, port)
    deploy(cfg)
    yield {"url": f"http://127.0.0.1:{port}", "cfg": cfg, "redis": redis_server}
    _deployed["cfg"] = None
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def cluster(serve_cluster):
    """The package's cluster in its own configuration (redeployed if a test left a variant)."""
    deploy(serve_cluster["cfg"])
    return serve_cluster


@pytest.fixture
def client(cluster):
    from openai import OpenAI

    return OpenAI(base_url=cluster["url"] + "/v1", api_key=KEY_A, timeout=300, max_retries=0)
