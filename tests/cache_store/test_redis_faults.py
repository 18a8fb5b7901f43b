"""Redis killed mid-write and mid-read, then restarted: never a corrupt copy, always typed errors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from lessserve.cache_store import codec
from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.errors import CacheMissError, TierUnavailableError
from lessserve.cache_store.redis_kv import RedisKV
from lessserve.cache_store.shared_tier import SharedTier

ID = codec.CacheIdentity(model="m", policy="h2o", budget=8, less_weights="none")


def value(seed: int, numel: int = 40_000) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return bytes(codec.encode({"k": torch.randn(numel, generator=g)}, ID, {"seed": seed}))


def tier_for(server, prefix, part_bytes=4096) -> SharedTier:
    kv = RedisKV.from_config(StoreConfig(redis_url=server.url, redis_timeout_s=2.0))
    return SharedTier(kv, prefix=prefix, ttl_s=300, part_bytes=part_bytes)


def test_killed_before_the_pointer_flip_keeps_the_previous_copy(own_redis, prefix):
    v1, v2 = value(1), value(2)

    async def main():
        tier = tier_for(own_redis, prefix)
        await tier.put("s", v1)
        real_set = tier.kv.client.set

        async def set_then_crash(name, *a, **kw):
            if name.endswith(":ptr"):  # every part of v2 is written, the pointer is not flipped yet
                own_redis.kill()
            return await real_set(name, *a, **kw)

        tier.kv.client.set = set_then_crash
        with pytest.raises(TierUnavailableError):
            await tier.put("s", v2)
        with pytest.raises(TierUnavailableError):  # down: reads fail typed too, no hang, no None
            await tier.get("s")
        tier.kv.client.set = real_set
        own_redis.start()  # same port and folder: the append-only file brings back acknowledged writes
        got = await tier.get("s")
        assert bytes(got) == v1
        assert codec.decode(got, ID).meta == {"seed": 1}
        await tier.put("s", v2)  # and the tier works again
        assert bytes(await tier.get("s")) == v2
        await tier.close()

    asyncio.run(main())


def test_killed_mid_read_then_restarted(own_redis, prefix):
    v1 = value(3)

    async def main():
        tier = tier_for(own_redis, prefix)
        await tier.put("s", v1)
        real_pipeline = tier.kv.client.pipeline

        def crash_then_pipeline(*a, **kw):  # the pointer was read, the parts are not yet
            own_redis.kill()
            return real_pipeline(*a, **kw)

        tier.kv.client.pipeline = crash_then_pipeline
        with pytest.raises(TierUnavailableError):
            await tier.get("s")
        tier.kv.client.pipeline = real_pipeline
        own_redis.start()
        assert bytes(await tier.get("s")) == v1
        await tier.close()

    asyncio.run(main())


@pytest.mark.parametrize("delay_s", [0.0, 0.01, 0.05])
def test_killed_at_any_moment_of_a_large_write(own_redis, prefix, delay_s):
    """A 16 MB write in 64 parts; the server is SIGKILLed from another thread while it runs.
    After a restart the session reads back as exactly the old or exactly the new value."""
    v1, v2 = value(4, 4_000_000), value(5, 4_000_000)

    async def main():
        tier = tier_for(own_redis, prefix, part_bytes=256 << 10)
        await tier.put("s", v1)
        killer = threading.Timer(delay_s, own_redis.kill)
        killer.start()
        try:
            await tier.put("s", v2)
            wrote = True
        except TierUnavailableError:
            wrote = False
        killer.join()
        time.sleep(0.05)
        own_redis.start()
        got = bytes(await tier.get("s"))
        assert got in (v1, v2)
        if wrote:
            assert got == v2
        codec.decode(got, ID)
        await tier.close()

    asyncio.run(main())


def test_a_down_server_gives_typed_errors_everywhere(own_redis, prefix):
    async def main():
        tier = tier_for(own_redis, prefix)
        own_redis.kill()
        for call in (tier.contains("s"), tier.get("s"), tier.put("s", b"x"), tier.delete("s"), tier.keys()):
            with pytest.raises(TierUnavailableError):
                await call
        own_redis.start()
        with pytest.raises(CacheMissError):
            await tier.get("s")
        await tier.close()

    asyncio.run(main())
