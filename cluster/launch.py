"""Start Ray (local by default) and Serve, deploy the application, and stop it cleanly."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable

from lessserve.cluster.config import ServeConfig
from lessserve.errors.tree import LessServeError

APP_NAME = "lessserve"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXC_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*): (.+)$")  # "pkg.mod.SomeError: message"


class ReplicaStartError(LessServeError):
    """A replica failed in its constructor (out of memory, a corrupt weights file, ...): Serve gave
    up deploying the application. The message is the replica's own last error line."""


def replica_error(messages: Iterable[str]) -> str | None:
    """The last exception line ("SafetensorError: header too large") of the replica tracebacks
    Ray Serve puts in a failed deployment's status message; None if there is none."""
    found = None
    for message in messages:
        for line in _ANSI.sub("", message or "").splitlines():
            m = _EXC_LINE.match(line.rstrip())
            if m and not line.startswith((" ", "\t")):
                found = f"{m.group(1)}: {m.group(2)}"
    return found


def _deploy_failure(name: str, fallback: str) -> str:
    """One line for a failed deploy: which deployment, and its replica's own error."""
    from ray import serve
    from ray.serve._private.common import DeploymentStatus

    try:
        app = serve.status().applications[name]
    except Exception:  # noqa: BLE001 - the controller may be gone: say what serve.run said
        return fallback
    failed = {n: d.message for n, d in app.deployments.items() if d.status == DeploymentStatus.DEPLOY_FAILED}
    error = replica_error(failed.values())
    if not error:
        return fallback
    return f"a {'/'.join(failed) or 'replica'} replica failed to start: {error}"


def start(cfg: ServeConfig, address: str | None = None, num_cpus: int | None = None,
          after_init: Callable[[], None] | None = None) -> None:
    """Deploy `cfg` as it is: the caller resolved it (no config source is applied again).
    `after_init` runs right after ray.init (which installs Ray's own SIGTERM handler: a stack
    dump, then abort), e.g. to put the caller's signal handlers back before the slow deploy.
    A replica that fails to start raises ReplicaStartError with its own error, after Ray is shut
    down (Ray's deploy traceback is not the user's business)."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", num_cpus=num_cpus,
                 include_dashboard=False, log_to_driver=False, logging_level="WARNING", namespace="lessserve")
    if after_init:
        after_init()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's "Started Serve ..." lines
    from lessserve.cluster.app import app_from_config

    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        try:
            serve.run(app_from_config(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as e:  # Serve's "Deploying application lessserve failed: ..." (DEPLOY_FAILED)
            message = _deploy_failure(APP_NAME, (str(e).strip().splitlines() or ["deploy failed"])[0])  # Serve still up
            raise ReplicaStartError(message) from None
    except BaseException:  # any failure half-way (a proxy actor killed while starting too): Ray goes down with it
        stop()
        raise


def stop() -> None:
    """Shut Serve down (workers drain their sessions) and Ray with it."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
