"""preStop hooks of the Ray pods: let worker replicas drain their sessions to Redis before the pod dies.

    python -m lessserve.deploy.prestop --timeout SECONDS               # worker pods
    python -m lessserve.deploy.prestop --role head --timeout SECONDS   # the head pod

Worker pod:
1. Tell Ray the node is going away (`ray drain-node`, reason preemption, deadline = timeout): Serve stops
   the replicas there gracefully (and starts replacements elsewhere when it can); a stopping worker
   replica offloads its sessions to Redis (LessWorker.__del__ -> drain) within drain_timeout_s.
2. Wait until no worker replica process is left on this pod, at most `timeout` seconds.
3. `ray stop`, so the raylet leaves the cluster cleanly before Kubernetes kills the container.

Head pod: wait (at most `timeout`) until no worker replica is alive anywhere in the cluster, so the GCS
and the Serve controller outlive the workers' drains when the whole cluster is deleted (a KubeRay
NewCluster upgrade deletes the old cluster's pods all at once).

Every step is best effort: a preStop hook that fails still lets the pod terminate.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPLICA_MARKERS = ("ServeReplica:", ":LessWorker")  # a Serve replica actor of the LessWorker deployment


def replica_pids(proc: Path = Path("/proc"), markers: Iterable[str] = REPLICA_MARKERS) -> list[int]:
    """Pids of worker replica processes (Ray sets the process title to `ray::ServeReplica:<app>:<deployment>`)."""
    pids = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            title = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(m in title for m in markers):
            pids.append(int(d.name))
    return sorted(pids)


def cluster_replicas(address: str = "http://127.0.0.1:8265", markers: Iterable[str] = REPLICA_MARKERS,
                     list_actors: Callable[..., list] | None = None) -> list[str]:
    """Ids of alive worker replica actors in the whole cluster (Ray's state API on the head's dashboard);
    [] when the state API cannot be reached (nothing to wait for then)."""
    try:
        if list_actors is None:
            from ray.util.state import list_actors
        actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10000, timeout=10,
                             raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - a dead dashboard means there is nothing left to wait for
        return []
    out = []
    for a in actors:
        a = a if isinstance(a, dict) else vars(a)
        if all(m in (a.get("class_name") or "") for m in markers):
            out.append(a.get("actor_id"))
    return out


def _run(cmd: list[str], timeout: float) -> int:
    try:
        return subprocess.run(cmd, timeout=timeout, capture_output=True).returncode
    except (OSError, subprocess.SubprocessError):
        return -1


def drain_node(deadline_s: int) -> int:
    return _run(["ray", "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                 "--reason-message", "Kubernetes pod terminating (preStop)",
                 "--deadline-remaining-seconds", str(deadline_s)], timeout=30)


def stop_ray() -> int:
    return _run(["ray", "stop"], timeout=60)


def run(timeout: float, poll_s: float = 1.0, *, drain: Callable[[int], int] | None = drain_node,
        replicas: Callable[[], list] = replica_pids, stop: Callable[[], int] | None = stop_ray,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict:
    """The hook's steps (drain / stop None: skipped); returns what happened (for logs and tests)."""
    start = clock()
    left = replicas()
    drained = drain(max(1, int(timeout))) if drain and left else None
    while left and clock() - start < timeout:
        sleep(poll_s)
        left = replicas()
    return {"drain_rc": drained, "replicas_left": left, "waited_s": round(clock() - start, 1),
            "stop_rc": stop() if stop else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lessserve.deploy.prestop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, required=True, help="most seconds to wait for replicas to drain")
    ap.add_argument("--role", choices=("worker", "head"), default="worker")
    ap.add_argument("--poll", type=float, default=1.0)
    a = ap.parse_args(argv)
    if a.role == "head":
        out = run(a.timeout, max(a.poll, 2.0), drain=None, replicas=cluster_replicas, stop=None)
    else:
        out = run(a.timeout, a.poll)
    print(f"lessserve preStop ({a.role}): {out}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
