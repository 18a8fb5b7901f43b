"""Response records: a response id names a point in a conversation, owned by the API key that
created it. A view over the shared KV (Redis when configured, else the cluster-state actor;
cluster/shared_state.py), one JSON value per record, `lessserve:resp:<owner>:<id>` (a key's records
under its own prefix: another key's lookup names another key, and `usage` counts a key's records
and bytes in one scan; records written before carry no owner in their key and are still read),
expiring after its TTL
(and, in the actor, at most `max_records` of them, the oldest written dropped first).

A record holds its own turn (the new input messages and the reply) and a pointer to its parent
(`previous_response_id`), not the whole history: a chain of n responses costs O(n) bytes, not
O(n^2). Every SNAPSHOT_EVERY-th response of a chain (`depth` 0, 16, 32, ...) also keeps the whole
history up to it (`messages`), so rebuilding a conversation (`history`) reads at most
SNAPSHOT_EVERY records. A conversation whose earlier response was deleted or has expired cannot be
continued past it (404 naming it). Records written before this format carry `messages` only: they
read as snapshots.

Record: {"id", "owner", "session", "created_at", "model", "turn", "depth", ("messages"),
"output_text", "finish", "usage", "previous_response_id", "instructions", "metadata", "temperature",
"top_p", "max_output_tokens", "store"}.
"""

from __future__ import annotations

import json

from lessserve.cache_store.errors import unavailable_as
from lessserve.cache_store.kv import KV
from lessserve.errors.tree import DependencyUnavailableError, NotFoundError

PREFIX = "lessserve:resp:"
SNAPSHOT_EVERY = 16


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

    def _key(self, rid: str, owner: str) -> str:
        return f"{self.prefix}{owner}:{rid}"

    async def put(self, rec: dict) -> None:
        with unavailable_as(ResponseStoreUnavailableError):
            if not self._capped:
                await self.kv.cap(self.prefix, self.max_records)
                self._capped = True
            await self.kv.set(self._key(rec["id"], rec["owner"]), json.dumps(rec), self.ttl_s)

    async def _raw(self, rid: str, owner: str) -> tuple[str, bytes | None]:
        key = self._key(rid, owner)
        with unavailable_as(ResponseStoreUnavailableError):
            raw = await self.kv.get(key)
            if raw is None:  # written before records were keyed by owner
                key = self.prefix + rid
                raw = await self.kv.get(key)
        return key, raw

    async def _owned(self, rid: str, owner: str) -> tuple[str, dict]:
        """(key, record) of `owner`'s response `rid`; ResponseNotFoundError for anyone else's or none."""
        key, raw = await self._raw(rid, owner)
        rec = json.loads(raw) if raw else None
        if rec is None or rec.get("owner") != owner:
            raise not_found(rid)
        return key, rec

    async def get(self, rid: str, owner: str) -> dict:
        return (await self._owned(rid, owner))[1]

    async def usage(self, owner: str) -> tuple[int, int]:
        """(records, bytes) this key stores (one bounded scan of its prefix)."""
        with unavailable_as(ResponseStoreUnavailableError):
            return await self.kv.used(f"{self.prefix}{owner}:")

    async def history(self, rid: str, owner: str) -> tuple[list[dict], dict]:
        """(the conversation's messages up to and including response `rid`, its record): its turn
        after its ancestors', back to the nearest snapshot (at most SNAPSHOT_EVERY reads)."""
        rec = await self.get(rid, owner)
        chain = [rec]
        while "messages" not in chain[-1] and chain[-1].get("previous_response_id"):
            prev = chain[-1]["previous_response_id"]
            try:
                chain.append(await self.get(prev, owner))
            except ResponseNotFoundError:
                raise ResponseNotFoundError(f"response {rid!r} cannot be continued: an earlier response of its "
                                            f"conversation ({prev}) was deleted or has expired") from None
        messages = list(chain[-1].get("messages") or chain[-1]["turn"])
        for r in reversed(chain[:-1]):
            messages += r["turn"]
        return messages, rec

    async def delete(self, rid: str, owner: str) -> dict:
        key, rec = await self._owned(rid, owner)
        with unavailable_as(ResponseStoreUnavailableError):
            await self.kv.delete(key)
        return rec
