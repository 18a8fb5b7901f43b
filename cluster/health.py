"""Liveness and readiness of the serving cluster, seen from a router.

Liveness (/healthz) is 200 while the router can answer. Readiness (/readyz) is 200 while requests
can be served, with status "degraded" and the reasons when a dependency is down (Redis: sessions
are then served from the workers' own tiers and rebuilt from requests), and 503 only when no worker
has reported in recently. Probes are cached for `ttl_s` so a probe storm never reaches Redis.
"""

from __future__ import annotations

import time

from lessserve.errors.tree import DependencyUnavailableError


class Health:
    def __init__(self, directory, state, redis: bool, worker_stale_s: float, ttl_s: float = 1.0):
        self.directory, self.state, self.redis = directory, state, redis
        self.worker_stale_s, self.ttl_s = worker_stale_s, ttl_s
        self._at, self._last = 0.0, None

    async def check(self) -> dict:
        if self._last is not None and time.monotonic() - self._at < self.ttl_s:
            return self._last
        reasons = []
        try:
            await self.directory.epoch()
        except DependencyUnavailableError as e:
            reasons.append(f"{'redis' if self.redis else 'cluster state'} unreachable: {e}")
        workers = None
        try:
            workers = await self.state.live_workers.remote(self.worker_stale_s)
        except Exception as e:  # noqa: BLE001 - the state actor is down: degraded, not dead
            reasons.append(f"cluster state actor unreachable: {type(e).__name__}")
        out = {"status": "degraded" if reasons else "ok", "reasons": reasons, "workers": workers}
        self._at, self._last = time.monotonic(), out
        return out
