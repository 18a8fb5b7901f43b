"""Response records: a response id names a point in a conversation, owned by the API key that
created it. Kept in the shared store (Redis when configured, else the cluster-state actor),
bounded by a TTL (and, in the actor, by a record count). A record holds the conversation's whole
history up to that response, so any worker can continue it, from a cache or from scratch.

Record: {"id", "owner", "session", "created_at", "model", "messages", "output_text", "finish",
"usage", "previous_response_id", "instructions", "metadata", "temperature", "top_p",
"max_output_tokens", "store"}.
"""

from __future__ import annotations

import json

from lessserve.cluster.state import get_state
from lessserve.errors.tree import DependencyUnavailableError, NotFoundError


class ResponseNotFoundError(NotFoundError):
    """No such response for this API key (another key's, expired, deleted, or created with store: false)."""


class ResponseStoreUnavailableError(DependencyUnavailableError):
    """The store of response records (Redis or the cluster-state actor) did not answer."""


def not_found(rid: str) -> ResponseNotFoundError:
    return ResponseNotFoundError(f"response {rid!r} not found (responses created with store: false cannot be "
                                 "retrieved or continued)")


class ActorResponses:
    def __init__(self, ttl_s: float, max_records: int):
        self.state, self.ttl_s, self.max_records = get_state(), ttl_s, max_records

    async def _call(self, method, *args):
        try:
            return await method.remote(*args)
        except Exception as e:  # noqa: BLE001 - actor death / network: one typed error
            raise ResponseStoreUnavailableError(f"cluster state actor: {type(e).__name__}") from e

    async def put(self, rec: dict) -> None:
        await self._call(self.state.response_put, rec["id"], json.dumps(rec), self.ttl_s, self.max_records)

    async def get(self, rid: str) -> dict | None:
        raw = await self._call(self.state.response_get, rid)
        return json.loads(raw) if raw else None

    async def delete(self, rid: str) -> bool:
        return await self._call(self.state.response_delete, rid)


class RedisResponses:
    """One key per record, `lessserve:resp:<id>`, expiring after ttl_s."""

    def __init__(self, url: str, ttl_s: float, prefix: str = "lessserve:resp"):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        self.r = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2,
                                         retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3))
        self.ttl_s, self.prefix = int(ttl_s), prefix

    async def _call(self, coro):
        from redis.exceptions import RedisError

        try:
            return await coro
        except (RedisError, OSError) as e:
            raise ResponseStoreUnavailableError(f"redis: {type(e).__name__}: {e}") from e

    async def put(self, rec: dict) -> None:
        await self._call(self.r.set(f"{self.prefix}:{rec['id']}", json.dumps(rec), ex=self.ttl_s))

    async def get(self, rid: str) -> dict | None:
        raw = await self._call(self.r.get(f"{self.prefix}:{rid}"))
        return json.loads(raw) if raw else None

    async def delete(self, rid: str) -> bool:
        return bool(await self._call(self.r.delete(f"{self.prefix}:{rid}")))


class ResponseStore:
    """Records by id, each visible only to its owner, over a backend with put / get / delete
    (RedisResponses, ActorResponses, or a dict in tests)."""

    def __init__(self, backend):
        self.backend = backend

    @classmethod
    def from_config(cls, redis_url: str | None, ttl_s: float, max_records: int) -> ResponseStore:
        return cls(RedisResponses(redis_url, ttl_s) if redis_url else ActorResponses(ttl_s, max_records))

    async def put(self, rec: dict) -> None:
        await self.backend.put(rec)

    async def get(self, rid: str, owner: str) -> dict:
        rec = await self.backend.get(rid)
        if rec is None or rec.get("owner") != owner:
            raise not_found(rid)
        return rec

    async def delete(self, rid: str, owner: str) -> dict:
        rec = await self.get(rid, owner)
        await self.backend.delete(rid)
        return rec
