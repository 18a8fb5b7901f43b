"""Several real Ray nodes on this machine (ray.cluster_utils.Cluster): a head that runs the router
(custom resource `head`) and worker nodes that each run one worker replica (`worker_node`), a
real redis-server as the shared tier and directory, the default model. Ray must not be running
yet: this folder's tests run before the package's single-node `cluster` fixture starts."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from lessserve.testing.local_redis import LocalRedis, free_port  # noqa: E402
from tests.cluster.conftest import KEY_A, cluster_config  # noqa: E402

NODE = {"num_cpus": 1, "object_store_memory": 150 * 2**20}


def multinode_config(redis_url: str, port: int, workers: int) -> dict:
    cfg = cluster_config(redis_url, port, workers)
    cfg.update(worker_resources={"worker_node": 1}, router_resources={"head": 0.1}, worker_num_cpus=0.5)
    return cfg


def deploy_and_wait(cfg: dict, timeout: float = 300) -> None:
    from ray import serve

    from lessserve.cluster.app import build_app
    from tests.cluster.conftest import wait_workers

    serve.run(build_app(cfg), name="lessserve", route_prefix="/", blocking=False)
    wait_workers(cfg["workers"]["min_workers"], timeout)


@pytest.fixture(scope="module")
def nodes():
    """{"cluster", "workers": [node, node], "url", "cfg", "redis"}: head + two worker nodes."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "multinode tests need their own Ray cluster"
    redis = LocalRedis().start()
    c = Cluster(initialize_head=True, head_node_args={**NODE, "resources": {"head": 1}})
    workers = [c.add_node(**NODE, resources={"worker_node": 1}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level="WARNING", namespace="lessserve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly",
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    cfg = multinode_config(redis.url, port, workers=2)
    t0 = time.time()
    deploy_and_wait(cfg)
    yield {"cluster": c, "workers": workers, "url": f"http://127.0.0.1:{port}", "cfg": cfg, "redis": redis,
           "deploy_s": time.time() - t0, "key": KEY_A}
    serve.shutdown()
    ray.shutdown()
    c.shutdown()
    redis.stop()
