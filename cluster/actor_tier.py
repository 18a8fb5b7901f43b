"""The in-cluster shared tier (no Redis configured): session caches and transcripts held as
bytes by the cluster-state actor, so any worker can restore a session another worker drained."""

from __future__ import annotations

import json

from lessserve.cache_store.codec import Blob
from lessserve.cache_store.errors import CacheMissError, TierUnavailableError
from lessserve.cache_store.tier import Tier, TierStats
from lessserve.cache_store.transcripts import TranscriptStore


async def _call(method, *args):
    try:
        return await method.remote(*args)
    except Exception as e:  # noqa: BLE001 - actor death / network: one typed error
        raise TierUnavailableError(f"cluster state actor unavailable: {e}") from e


class ActorTier(Tier):
    name = "cluster"  # the shared tier without Redis: blobs held by the cluster-state actor

    def __init__(self, state, prefix: str = "kv:"):
        self.state, self.prefix = state, prefix
        self.transcripts = ActorTranscripts(state)

    async def contains(self, sid: str) -> bool:
        return await _call(self.state.blob_get, self.prefix + sid) is not None

    async def get(self, sid: str) -> Blob:
        v = await _call(self.state.blob_get, self.prefix + sid)
        if v is None:
            raise CacheMissError(f"session {sid!r} is not in the cluster tier")
        return v

    async def put(self, sid: str, blob: Blob) -> None:
        await _call(self.state.blob_put, self.prefix + sid, bytes(blob))  # replaced whole, atomically

    async def delete(self, sid: str) -> bool:
        return await _call(self.state.blob_delete, self.prefix + sid)

    async def keys(self) -> list[str]:
        return [k[len(self.prefix):] for k in await _call(self.state.blob_keys) if k.startswith(self.prefix)]

    async def stats(self) -> TierStats:
        keys = await self.keys()
        return TierStats(sessions=len(keys), bytes=await _call(self.state.blob_bytes, self.prefix))


class ActorTranscripts(TranscriptStore):
    def __init__(self, state, prefix: str = "tr:"):
        self.state, self.prefix = state, prefix

    async def put(self, sid: str, transcript: dict) -> None:
        await _call(self.state.blob_put, self.prefix + sid, json.dumps(transcript).encode())

    async def get(self, sid: str) -> dict:
        v = await _call(self.state.blob_get, self.prefix + sid)
        if v is None:
            raise CacheMissError(f"session {sid!r} has no transcript")
        return json.loads(v)

    async def delete(self, sid: str) -> bool:
        return await _call(self.state.blob_delete, self.prefix + sid)
