"""Session-affine routing as a unit (no Ray cluster): a session its directory places on a live
worker goes to that worker only (never to a second worker while the first may be mid-turn); a new
session, or one whose worker is gone, is ranked by rendezvous hashing, its fallbacks after it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from lessserve.cluster.routing import SessionAffinityRouter, rendezvous_rank


def replica(rid: str):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid))


def choose(preferred: str | None, sid: str | None, ids: list[str]) -> list[list[str]]:
    async def pref(_sid):
        return preferred

    router = SimpleNamespace(_preferred=pref)
    pending = SimpleNamespace(metadata=SimpleNamespace(session_id=sid))
    ranks = asyncio.run(SessionAffinityRouter.choose_replicas(router, [replica(i) for i in ids], pending))
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_a_placed_session_goes_to_its_worker_only():
    assert choose("w2", "s", ["w1", "w2", "w3"]) == [["w2"]]


def test_a_new_or_orphaned_session_is_ranked_by_rendezvous_hashing():
    ids = ["w1", "w2", "w3"]
    want = [[r] for r in rendezvous_rank("s", ids)]
    assert choose(None, "s", ids) == want  # new
    assert choose("w9", "s", ids) == want  # its worker is gone: every live worker, in hash order
    assert len({tuple(choose(None, f"s{i}", ids)[0]) for i in range(30)}) == 3  # spread over workers
