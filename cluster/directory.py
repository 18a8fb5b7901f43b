"""Where each session's cache lives and who owns it: in Redis when configured, else in the
cluster-state actor. Both backends speak the same small async API."""

from __future__ import annotations

import json
import time

from lessserve.cluster.state import get_state


class ActorDirectory:
    def __init__(self):
        self.state = get_state()

    async def lookup(self, sid: str) -> dict | None:
        return await self.state.lookup.remote(sid)

    async def place(self, sid: str, worker: str | None = None, owner: str | None = None) -> dict:
        return await self.state.place.remote(sid, worker, owner)

    async def forget(self, sid: str) -> None:
        await self.state.forget.remote(sid)

    async def leave(self, worker: str) -> int:
        return await self.state.leave.remote(worker)


class RedisDirectory:
    """One Redis hash: session id -> JSON {"worker", "owner", "t"}."""

    def __init__(self, url: str, key: str = "lessserve:directory"):
        import redis.asyncio as aioredis

        self.r = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.key = key

    async def lookup(self, sid: str) -> dict | None:
        raw = await self.r.hget(self.key, sid)
        return json.loads(raw) if raw else None

    async def place(self, sid: str, worker: str | None = None, owner: str | None = None) -> dict:
        e = await self.lookup(sid) or {"worker": None, "owner": owner}
        if worker is not None:
            e["worker"] = worker
        if owner is not None and e.get("owner") is None:
            e["owner"] = owner
        e["t"] = time.time()
        await self.r.hset(self.key, sid, json.dumps(e))
        return e

    async def forget(self, sid: str) -> None:
        await self.r.hdel(self.key, sid)

    async def leave(self, worker: str) -> int:
        n = 0
        for sid, raw in (await self.r.hgetall(self.key)).items():
            e = json.loads(raw)
            if e.get("worker") == worker:
                e["worker"], n = None, n + 1
                await self.r.hset(self.key, sid, json.dumps(e))
        return n


def make_directory(redis_url: str | None):
    return RedisDirectory(redis_url) if redis_url else ActorDirectory()
