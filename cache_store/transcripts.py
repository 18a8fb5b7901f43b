"""Durable session transcripts (token ids + chat messages), kept beside every cache.

A transcript is small (a few KB) and is what rebuilds a session whose cache is lost, corrupt or
incompatible. It is an opaque JSON dict here; the worker decides what goes in it. One key per
session in the shared KV, p:s:ts (JSON), expiring after `ttl_s`; a MemoryKV without a shared one.
"""

from __future__ import annotations

import json

from lessserve.cache_store.errors import CacheMissError
from lessserve.cache_store.kv import KV


class Transcripts:
    def __init__(self, kv: KV, prefix: str = "lessserve:kv", ttl_s: float | None = None):
        self.kv, self.prefix, self.ttl_s = kv, prefix, ttl_s

    def _key(self, sid: str) -> str:
        return f"{self.prefix}:{sid}:ts"

    async def put(self, sid: str, transcript: dict) -> None:
        await self.kv.set(self._key(sid), json.dumps(transcript, separators=(",", ":")), self.ttl_s)

    async def get(self, sid: str) -> dict:
        """CacheMissError if the session has no transcript."""
        raw = await self.kv.get(self._key(sid))
        if raw is None:
            raise CacheMissError(f"session {sid!r} has no transcript")
        return json.loads(raw)

    async def delete(self, sid: str) -> bool:
        return bool(await self.kv.delete(self._key(sid)))
