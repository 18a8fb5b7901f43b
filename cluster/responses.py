"""Response records: a response id names a point in a conversation, owned by the API key that
created it. A view over the shared KV (Redis when configured, else the cluster-state actor;
cluster/shared_state.py), one JSON value per record, `lessserve:resp:<id>`, expiring after its TTL
(and, in the actor, at most `max_records` of them, the oldest written dropped first). A record
holds the conversation's whole history up to that response, so any worker can continue it, from
a cache or from scratch.

Record: {"id", "owner", "session", "created_at", "model", "messages", "output_text", "finish",
"usage", "previous_response_id", "instructions", "metadata", "temperature", "top_p",
"max_output_tokens", "store"}.
"""

from __future__ import annotations

import json

from lessserve.cache_store.errors import unavailable_as
from lessserve.cache_store.kv import KV
from lessserve.errors.tree import DependencyUnavailableError, NotFoundError

PREFIX = "lessserve:resp:"


class ResponseNotFoundError(NotFoundError):
    """No such response for this API key (another key's, expired, deleted, or created with store: false)."""


class ResponseStoreUnavailableError(DependencyUnavailableError):
    """The store of response records (Redis or the cluster-state actor) did not answer."""


def not_found(rid: str) -> ResponseNotFoundError:
    return ResponseNotFoundError(f"response {rid!r} not found (responses created with store: false cannot be "
                                 "retrieved or continued)")


class ResponseStore:
    """Records by id, each visible only to its owner: a view over the shared KV (Redis, the
    cluster-state actor, or a MemoryKV in tests)."""

    def __init__(self, kv: KV, ttl_s: float, max_records: int, prefix: str = PREFIX):
        self.kv, self.ttl_s, self.max_records, self.prefix = kv, ttl_s, max_records, prefix
        self._capped = False

    async def put(self, rec: dict) -> None:
        with unavailable_as(ResponseStoreUnavailableError):
            if not self._capped:
                await self.kv.cap(self.prefix, self.max_records)
                self._capped = True
            await self.kv.set(self.prefix + rec["id"], json.dumps(rec), self.ttl_s)

    async def get(self, rid: str, owner: str) -> dict:
        with unavailable_as(ResponseStoreUnavailableError):
            raw = await self.kv.get(self.prefix + rid)
        rec = json.loads(raw) if raw else None
        if rec is None or rec.get("owner") != owner:
            raise not_found(rid)
        return rec

    async def delete(self, rid: str, owner: str) -> dict:
        rec = await self.get(rid, owner)
        with unavailable_as(ResponseStoreUnavailableError):
            await self.kv.delete(self.prefix + rid)
        return rec
