"""Session-affine request routing for the worker deployment (Ray Serve custom RequestRouter).

For a request carrying a session id: the worker the directory names, if it is alive, and only
that one: a session's turns never run on two workers at once (a turn that finds its worker
saturated waits for it, and on it for the session's previous turn; cluster/worker.py). Otherwise
(a new session, or its worker is gone) the replicas ranked by rendezvous hashing of (session id,
replica id), so any router (restarted or not) picks the same worker and adding or removing a
worker only moves the sessions that hashed to it; later ranks are the fallback when the first is
saturated. Requests without a session id go to the less loaded of two random replicas.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

from lessserve.cache_store.config import StoreConfig
from lessserve.cluster.directory import SessionDirectory
from lessserve.cluster.shared_state import shared_kv

log = logging.getLogger("ray.serve")


def rendezvous_rank(session_id: str, replica_ids: list[str]) -> list[str]:
    """Replica ids by descending hash weight for this session (highest random weight)."""
    def weight(rid: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{session_id}\0{rid}".encode(), digest_size=8).digest(), "big")

    return sorted(replica_ids, key=weight, reverse=True)


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    REMEMBERED = 100_000  # sessions whose last replica this router keeps (for directory outages)

    def initialize_state(self, store: dict | None = None, **kwargs):
        """`store`: the StoreConfig mapping (where the session directory lives)."""
        super().initialize_state(**kwargs)
        self._store = StoreConfig.model_validate(store or {})
        self._directory = None
        self._last: OrderedDict[str, str] = OrderedDict()  # session -> replica this router last sent it to

    async def _preferred(self, sid: str) -> str | None:
        """The directory's worker; while the directory is down, the replica this router last sent
        the session to (so a degraded cluster keeps each session on one worker)."""
        try:
            if self._directory is None:  # made here: on the loop this router runs on
                self._directory = SessionDirectory(shared_kv(self._store))
            entry = await self._directory.lookup(sid)
        except Exception as e:  # noqa: BLE001 - the directory is a hint; memory and hashing still route
            log.warning("session directory lookup failed: %s", e)
            return self._last.get(sid)
        return entry.get("worker") if entry else self._last.get(sid)

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        sid = pending_request.metadata.session_id if pending_request is not None else None
        if sid:
            self._last[sid] = replica_id.unique_id
            self._last.move_to_end(sid)
            while len(self._last) > self.REMEMBERED:
                self._last.popitem(last=False)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        sid = pending_request.metadata.session_id if pending_request is not None else None
        if not sid:
            return await super().choose_replicas(candidate_replicas, pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        preferred = await self._preferred(sid)
        if preferred in by_id:  # the worker that holds the session: no fallback, it may be mid-turn
            return [[by_id[preferred]]]
        return [[by_id[rid]] for rid in rendezvous_rank(sid, list(by_id))]
