"""RedisKV: the shared-state interface (kv.py) over one redis-py asyncio client.

`make_client(config)` is the one place this package connects to Redis: URL (redis://, rediss://
for TLS, unix://), password (in the URL, `redis_password` or `redis_password_file`), a blocking connection pool of
`redis_pool_size`, socket timeouts and one retry after a dropped connection (a restarted server
costs a reconnect, not a failed call). Each call is also bounded by `asyncio.wait_for` at
`redis_timeout_s`: a server that hangs (SIGSTOP, a stuck network) fails the call then, instead of
a socket timeout plus a retry. Every failure is TierUnavailableError.

A client belongs to the event loop that first uses it: a process with two loops holds one
RedisKV per loop, each from `RedisKV.from_config`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Mapping
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.errors import TierUnavailableError
from lessserve.cache_store.kv import KEYS_LIMIT, KV, Value

T = TypeVar("T")
SCAN_COUNT = 1000  # keys Redis visits per SCAN round trip


def make_client(config: StoreConfig) -> aioredis.Redis:
    """An asyncio client over a blocking connection pool (callers wait for a free connection, at
    most the timeout)."""
    if not config.redis_url:
        raise TierUnavailableError("no Redis configured (StoreConfig.redis_url is None)")
    t = config.redis_timeout_s
    password = config.password()
    kw = {"password": password} if password is not None else {}
    pool = aioredis.BlockingConnectionPool.from_url(
        config.redis_url, max_connections=config.redis_pool_size, timeout=t, socket_timeout=t,
        socket_connect_timeout=t, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1), **kw)
    return aioredis.Redis(connection_pool=pool)


# compare-and-set: ARGV = absent-expected flag, expected value, new value, TTL in ms ("" for none)
_CAS = """
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur then return 0 end
elseif cur ~= ARGV[2] then
  return 0
end
if ARGV[4] == '' then redis.call('SET', KEYS[1], ARGV[3]) else redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4]) end
return 1
"""


def _glob(s: str) -> str:
    """`s` matched literally by a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


class RedisKV(KV):
    name = "redis"

    def __init__(self, client: aioredis.Redis, timeout_s: float = 5.0):
        self.client, self.timeout_s = client, timeout_s
        self._cas = client.register_script(_CAS)  # EVALSHA, loaded again by redis-py after a restart

    @classmethod
    def from_config(cls, config: StoreConfig) -> RedisKV:
        return cls(make_client(config), config.redis_timeout_s)

    async def _do(self, what: str, aw: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(aw, self.timeout_s)
        except TimeoutError as e:  # the deadline (asyncio's TimeoutError is the builtin one, an OSError)
            raise TierUnavailableError(f"redis {what}: no answer within {self.timeout_s:g} s") from e
        except (RedisError, OSError) as e:
            raise TierUnavailableError(f"redis {what}: {type(e).__name__}: {e}") from e

    async def get(self, key: str) -> bytes | None:
        return await self._do("GET", self.client.get(key))

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []

        async def run():  # a pipeline, not MGET: values may be large parts, and it works on a cluster
            async with self.client.pipeline(transaction=False) as p:
                for k in keys:
                    p.get(k)
                return await p.execute()

        return await self._do("GET", run())

    async def set(self, key: str, value: Value, ttl_s: float | None = None) -> None:
        await self._do("SET", self.client.set(key, value, px=_ms(ttl_s)))

    async def set_many(self, items: Mapping[str, Value], ttl_s: float | None = None) -> None:
        if not items:
            return

        async def run():
            async with self.client.pipeline(transaction=False) as p:
                for k, v in items.items():
                    p.set(k, v, px=_ms(ttl_s))
                await p.execute()

        await self._do("SET", run())

    async def swap(self, key: str, value: Value, ttl_s: float | None = None) -> bytes | None:
        return await self._do("SET GET", self.client.set(key, value, px=_ms(ttl_s), get=True))

    async def pop(self, key: str) -> bytes | None:
        return await self._do("GETDEL", self.client.getdel(key))

    async def cas(self, key: str, expect: Value | None, value: Value, ttl_s: float | None = None) -> bool:
        ms = _ms(ttl_s)
        args = ["1" if expect is None else "0", b"" if expect is None else expect, value, "" if ms is None else str(ms)]
        return bool(await self._do("EVALSHA cas", self._cas(keys=[key], args=args)))

    async def delete(self, *keys: str) -> int:
        return int(await self._do("DEL", self.client.delete(*keys))) if keys else 0

    async def exists(self, key: str) -> bool:
        return bool(await self._do("EXISTS", self.client.exists(key)))

    async def keys(self, prefix: str = "", suffix: str = "", limit: int = KEYS_LIMIT) -> list[str]:
        """SCAN, each round trip under the deadline, stopping after `limit` keys."""
        match, cursor, out = f"{_glob(prefix)}*{_glob(suffix)}", 0, {}
        while True:
            cursor, batch = await self._do("SCAN", self.client.scan(cursor, match=match, count=SCAN_COUNT))
            out.update((k.decode(), None) for k in batch)  # a key may come twice while Redis rehashes
            if cursor == 0 or len(out) >= limit:
                return list(out)[:limit]

    async def epoch(self) -> str:
        return (await self._do("INFO", self.client.info("server")))["run_id"]

    async def used(self, prefix: str = "") -> tuple[int, int]:
        keys = await self.keys(prefix)
        total = 0
        for i in range(0, len(keys), SCAN_COUNT):
            async def run(chunk=keys[i : i + SCAN_COUNT]):
                async with self.client.pipeline(transaction=False) as p:
                    for k in chunk:
                        p.strlen(k)
                    return await p.execute()

            total += sum(await self._do("STRLEN", run()))
        return len(keys), total

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()


def _ms(ttl_s: float | None) -> int | None:
    return None if ttl_s is None else max(1, round(ttl_s * 1000))
