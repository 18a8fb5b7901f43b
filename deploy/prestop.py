"""preStop hook of a Ray worker pod: let this node's worker replicas drain their sessions, then stop Ray.

    python -m lessserve.deploy.prestop --timeout SECONDS

1. Tell Ray the node is going away (`ray drain-node`, reason preemption, deadline = timeout): Serve then
   starts replacement replicas elsewhere and stops the ones here gracefully, and a stopping worker
   replica offloads its sessions to Redis (LessWorker.__del__ -> drain) within drain_timeout_s.
2. Wait until no worker replica process is left on this pod, at most `timeout` seconds.
3. `ray stop`, so the raylet leaves the cluster cleanly before Kubernetes kills the container.

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


def run(timeout: float, poll_s: float = 1.0, *, drain: Callable[[int], int] = drain_node,
        replicas: Callable[[], list[int]] = replica_pids, stop: Callable[[], int] = stop_ray,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict:
    """The hook's steps; returns what happened (for logs and tests)."""
    start = clock()
    drained = drain(max(1, int(timeout))) if replicas() else None
    left = replicas()
    while left and clock() - start < timeout:
        sleep(poll_s)
        left = replicas()
    return {"drain_rc": drained, "replicas_left": left, "waited_s": round(clock() - start, 1), "stop_rc": stop()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lessserve.deploy.prestop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, required=True, help="most seconds to wait for replicas to drain")
    ap.add_argument("--poll", type=float, default=1.0)
    a = ap.parse_args(argv)
    print(f"lessserve preStop: {run(a.timeout, a.poll)}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
