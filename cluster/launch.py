"""Start Ray (local by default) and Serve, deploy the application, and stop it cleanly."""

from __future__ import annotations

import os
from collections.abc import Callable

from lessserve.cluster.config import ServeConfig


def start(cfg: ServeConfig, address: str | None = None, num_cpus: int | None = None,
          after_init: Callable[[], None] | None = None) -> None:
    """Deploy `cfg` as it is: the caller resolved it (no config source is applied again).
    `after_init` runs right after ray.init (which installs Ray's own SIGTERM handler: a stack
    dump, then abort), e.g. to put the caller's signal handlers back before the slow deploy."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", num_cpus=num_cpus,
                 include_dashboard=False, log_to_driver=False, logging_level="WARNING", namespace="lessserve")
    if after_init:
        after_init()
    serve.start(http_options={"host": cfg.host, "port": cfg.port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    from lessserve.cluster.app import app_from_config

    serve.run(app_from_config(cfg), name="lessserve", route_prefix="/", blocking=False)


def stop() -> None:
    """Shut Serve down (workers drain their sessions) and Ray with it."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
