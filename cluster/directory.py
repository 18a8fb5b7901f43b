"""Where each session's cache lives and who owns it: in Redis when configured, else in the
cluster-state actor. Both backends speak the same small async API and fail with one typed error,
DirectoryUnavailableError; `WriteBehind` keeps a worker's writes through an outage."""

from __future__ import annotations

import json

from lessserve.cluster.state import get_state, merged_entry
from lessserve.errors.tree import DependencyUnavailableError


class DirectoryUnavailableError(DependencyUnavailableError):
    """The session directory's backend (Redis, the cluster-state actor) did not answer."""


class ActorDirectory:
    def __init__(self):
        self.state = get_state()

    async def _call(self, method, *args):
        try:
            return await method.remote(*args)
        except Exception as e:  # noqa: BLE001 - actor death / network: one typed error
            raise DirectoryUnavailableError(f"cluster state actor: {type(e).__name__}: {e}") from e

    async def lookup(self, sid: str) -> dict | None:
        return await self._call(self.state.lookup, sid)

    async def place(self, sid: str, worker: str | None = None, owner: str | None = None, turns: int | None = None,
                    if_newer: bool = False) -> dict | None:
        return await self._call(self.state.place, sid, worker, owner, turns, if_newer)

    async def forget(self, sid: str) -> None:
        await self._call(self.state.forget, sid)

    async def leave(self, worker: str) -> int:
        return await self._call(self.state.leave, worker)

    async def epoch(self) -> str:
        """Changes when the backend lost its contents (the actor's start time)."""
        return str(await self._call(self.state.started_at))


class RedisDirectory:
    """One Redis hash: session id -> JSON {"worker", "owner", "t"}."""

    def __init__(self, url: str, key: str = "lessserve:directory", timeout_s: float = 2.0):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError, TimeoutError

        # a restarted server costs one reconnect, not a failed call
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 3)
        self.r = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=retry,
                                         retry_on_error=[ConnectionError, TimeoutError])
        self.key = key

    async def _call(self, coro):
        from redis.exceptions import RedisError

        try:
            return await coro
        except (RedisError, OSError) as e:
            raise DirectoryUnavailableError(f"redis: {type(e).__name__}: {e}") from e

    async def lookup(self, sid: str) -> dict | None:
        raw = await self._call(self.r.hget(self.key, sid))
        return json.loads(raw) if raw else None

    async def place(self, sid: str, worker: str | None = None, owner: str | None = None, turns: int | None = None,
                    if_newer: bool = False) -> dict | None:
        e = merged_entry(await self.lookup(sid), worker, owner, turns, if_newer)
        if e is not None:
            await self._call(self.r.hset(self.key, sid, json.dumps(e)))
        return e

    async def forget(self, sid: str) -> None:
        await self._call(self.r.hdel(self.key, sid))

    async def leave(self, worker: str) -> int:
        n = 0
        for sid, raw in (await self._call(self.r.hgetall(self.key))).items():
            e = json.loads(raw)
            if e.get("worker") == worker:
                e["worker"], n = None, n + 1
                await self._call(self.r.hset(self.key, sid, json.dumps(e)))
        return n

    async def epoch(self) -> str:
        """Changes whenever the Redis server restarts (its run_id), emptied or from its AOF."""
        return (await self._call(self.r.info("server")))["run_id"]


def make_directory(redis_url: str | None):
    return RedisDirectory(redis_url) if redis_url else ActorDirectory()


class WriteBehind:
    """A worker's directory writes that survive an outage: a write that fails is kept (the latest
    per session) and replayed by `flush()`; `lookup` and `epoch` still raise, callers decide."""

    def __init__(self, directory):
        self.directory = directory
        self.pending: dict[str, tuple] = {}  # sid -> ("place", worker, owner, turns, if_newer) | ("forget",)
        self.failures = 0

    async def place(self, sid: str, worker: str, owner: str | None, turns: int | None = None,
                    if_newer: bool = False) -> None:
        await self._write(sid, ("place", worker, owner, turns, if_newer))

    async def forget(self, sid: str) -> None:
        await self._write(sid, ("forget",))

    async def _write(self, sid: str, op: tuple) -> None:
        self.pending.pop(sid, None)
        try:
            await self._apply(sid, op)
        except DirectoryUnavailableError:
            self.failures += 1
            self.pending[sid] = op

    async def _apply(self, sid: str, op: tuple) -> None:
        if op[0] == "place":
            await self.directory.place(sid, *op[1:])
        else:
            await self.directory.forget(sid)

    async def flush(self) -> int:
        """Replay kept writes in order; stops at the first failure. Returns how many are left."""
        for sid, op in list(self.pending.items()):
            try:
                await self._apply(sid, op)
            except DirectoryUnavailableError:
                break
            if self.pending.get(sid) == op:
                del self.pending[sid]
        return len(self.pending)

    async def leave(self, worker: str) -> int:
        return await self.directory.leave(worker)

    async def lookup(self, sid: str) -> dict | None:
        return await self.directory.lookup(sid)

    async def epoch(self) -> str:
        return await self.directory.epoch()
