"""Redis tier (redis-py asyncio): the shared level every worker of the cluster can reach.

A cache is written as parts of at most `part_bytes` under a fresh generation id, in one pipeline,
and only then made visible by flipping the session's pointer key (SET ... GET, atomic). A write
that fails midway therefore leaves the previous generation readable; its stray parts expire with
the TTL. Keys (prefix p, session s, generation g):
  p:s:ptr      "g:nparts:nbytes"
  p:s:g:i      part i of the encoded cache
Backend failures raise TierUnavailableError; a pointer whose parts are gone raises CacheMissError.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from lessserve.cache_store.codec import Blob
from lessserve.cache_store.errors import CacheMissError, TierUnavailableError, TruncatedError
from lessserve.cache_store.tier import Tier, TierStats


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Map redis-py / socket failures to TierUnavailableError."""
    try:
        yield
    except (RedisError, OSError) as e:
        raise TierUnavailableError(f"redis {what}: {type(e).__name__}: {e}") from e


def make_client(url: str, pool_size: int = 16, timeout_s: float = 5.0) -> aioredis.Redis:
    """An asyncio client over a blocking connection pool (callers wait for a free connection)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=timeout_s, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1))
    return aioredis.Redis(connection_pool=pool)


def _parse_ptr(raw: bytes) -> tuple[str, int, int]:
    gen, nparts, nbytes = raw.decode().split(":")
    return gen, int(nparts), int(nbytes)


class RedisTier(Tier):
    name = "redis"

    def __init__(self, client: aioredis.Redis, prefix: str = "lessserve:kv", ttl_s: int | None = None,
                 part_bytes: int = 16 << 20):
        self.client, self.prefix, self.ttl_s, self.part_bytes = client, prefix, ttl_s, part_bytes

    @classmethod
    def from_url(cls, url: str, prefix: str = "lessserve:kv", ttl_s: int | None = None, part_bytes: int = 16 << 20,
                 pool_size: int = 16, timeout_s: float = 5.0) -> RedisTier:
        return cls(make_client(url, pool_size, timeout_s), prefix, ttl_s, part_bytes)

    def _ptr(self, sid: str) -> str:
        return f"{self.prefix}:{sid}:ptr"

    def _part(self, sid: str, gen: str, i: int) -> str:
        return f"{self.prefix}:{sid}:{gen}:{i}"

    async def contains(self, sid: str) -> bool:
        with redis_errors("EXISTS"):
            return bool(await self.client.exists(self._ptr(sid)))

    async def _read(self, sid: str) -> bytes:
        with redis_errors("GET"):
            raw = await self.client.get(self._ptr(sid))
            if raw is None:
                raise CacheMissError(f"session {sid!r} is not in redis")
            gen, nparts, nbytes = _parse_ptr(raw)
            async with self.client.pipeline(transaction=False) as p:
                for i in range(nparts):
                    p.get(self._part(sid, gen, i))
                parts = await p.execute()
        if any(x is None for x in parts):
            raise CacheMissError(f"session {sid!r}: parts of generation {gen} are gone (expired or replaced)")
        blob = parts[0] if nparts == 1 else b"".join(parts)
        if len(blob) != nbytes:
            raise TruncatedError(f"session {sid!r}: {len(blob)} bytes in redis, pointer says {nbytes}")
        return blob

    async def get(self, sid: str) -> Blob:
        try:
            return await self._read(sid)
        except CacheMissError:  # a concurrent writer may have flipped the pointer between our reads
            return await self._read(sid)

    async def put(self, sid: str, blob: Blob) -> None:
        mv = memoryview(blob).cast("B") if not isinstance(blob, memoryview) or blob.format != "B" else blob
        n, step = len(mv), self.part_bytes
        parts = [mv[i : i + step] for i in range(0, n, step)] or [mv[0:0]]
        gen = uuid.uuid4().hex[:16]
        with redis_errors("SET"):
            async with self.client.pipeline(transaction=False) as p:
                for i, part in enumerate(parts):
                    p.set(self._part(sid, gen, i), part, ex=self.ttl_s)
                await p.execute()
            old = await self.client.set(self._ptr(sid), f"{gen}:{len(parts)}:{n}", ex=self.ttl_s, get=True)
        if old is not None:
            await self._drop_parts(sid, old)

    async def _drop_parts(self, sid: str, ptr: bytes) -> None:
        """Best effort: parts left behind by a failure here expire with the TTL."""
        gen, nparts, _ = _parse_ptr(ptr)
        with contextlib.suppress(RedisError, OSError):
            await self.client.delete(*[self._part(sid, gen, i) for i in range(nparts)])

    async def delete(self, sid: str) -> bool:
        with redis_errors("GETDEL"):
            old = await self.client.getdel(self._ptr(sid))
        if old is None:
            return False
        await self._drop_parts(sid, old)
        return True

    async def keys(self) -> list[str]:
        head, tail = f"{self.prefix}:", ":ptr"
        with redis_errors("SCAN"):
            found = [k.decode() async for k in self.client.scan_iter(match=f"{self.prefix}:*{tail}", count=1000)]
        return [k[len(head) : -len(tail)] for k in found]

    async def stats(self) -> TierStats:
        sids = await self.keys()
        if not sids:
            return TierStats()
        with redis_errors("MGET"):
            ptrs = await self.client.mget([self._ptr(s) for s in sids])
        sizes = [_parse_ptr(p)[2] for p in ptrs if p is not None]
        return TierStats(sessions=len(sizes), bytes=sum(sizes))

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()
