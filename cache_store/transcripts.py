"""Durable session transcripts (token ids + chat messages), kept beside every cache.

A transcript is small (a few KB) and is what rebuilds a session whose cache is lost, corrupt or
incompatible. It is an opaque JSON dict here; the worker decides what goes in it.
"""

from __future__ import annotations

import abc
import json

import redis.asyncio as aioredis

from lessserve.cache_store.errors import CacheMissError
from lessserve.cache_store.redis_tier import redis_errors


class TranscriptStore(abc.ABC):
    @abc.abstractmethod
    async def put(self, sid: str, transcript: dict) -> None: ...

    @abc.abstractmethod
    async def get(self, sid: str) -> dict:
        """CacheMissError if the session has no transcript."""

    @abc.abstractmethod
    async def delete(self, sid: str) -> bool: ...


class MemoryTranscripts(TranscriptStore):
    """Process-local transcripts: the embedded default without Redis."""

    def __init__(self):
        self._d: dict[str, str] = {}

    async def put(self, sid: str, transcript: dict) -> None:
        self._d[sid] = json.dumps(transcript)

    async def get(self, sid: str) -> dict:
        try:
            return json.loads(self._d[sid])
        except KeyError:
            raise CacheMissError(f"session {sid!r} has no transcript") from None

    async def delete(self, sid: str) -> bool:
        return self._d.pop(sid, None) is not None


class RedisTranscripts(TranscriptStore):
    """Transcripts in the shared Redis tier, one key per session: p:s:ts (JSON)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "lessserve:kv", ttl_s: int | None = None):
        self.client, self.prefix, self.ttl_s = client, prefix, ttl_s

    def _key(self, sid: str) -> str:
        return f"{self.prefix}:{sid}:ts"

    async def put(self, sid: str, transcript: dict) -> None:
        with redis_errors("SET transcript"):
            await self.client.set(self._key(sid), json.dumps(transcript, separators=(",", ":")), ex=self.ttl_s)

    async def get(self, sid: str) -> dict:
        with redis_errors("GET transcript"):
            raw = await self.client.get(self._key(sid))
        if raw is None:
            raise CacheMissError(f"session {sid!r} has no transcript in redis")
        return json.loads(raw)

    async def delete(self, sid: str) -> bool:
        with redis_errors("DEL transcript"):
            return bool(await self.client.delete(self._key(sid)))
