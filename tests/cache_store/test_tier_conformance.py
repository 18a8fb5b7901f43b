"""One conformance suite every tier passes: device slots, host memory (local, synchronous), the
shared tier over Redis (a real server) and over an in-process KV (async). The suite awaits each
call; a local tier's answer is awaited as is."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.errors import CacheMissError
from lessserve.cache_store.host_tier import HostTier
from lessserve.cache_store.kv import MemoryKV
from lessserve.cache_store.redis_kv import RedisKV
from lessserve.cache_store.shared_tier import SharedTier
from lessserve.workers.device_tier import EngineDeviceTier

KINDS = ["device", "host", "redis", "redis-small-parts", "memory-kv-small-parts"]


@pytest.fixture(params=KINDS)
def make_tier(request, tiny_engine_factory, redis_server, prefix):
    """An async-context factory: Redis clients must be made inside the test's own loop."""
    kind = request.param

    def make():
        if kind == "device":
            return EngineDeviceTier(tiny_engine_factory())
        if kind == "host":
            return HostTier(64 << 20)
        part = 4 << 20 if kind == "redis" else 4096  # many parts per value: exercises the pipeline
        kv = MemoryKV() if kind.startswith("memory") else RedisKV.from_config(StoreConfig(redis_url=redis_server.url))
        return SharedTier(kv, prefix=prefix, ttl_s=60, part_bytes=part)

    make.kind = kind
    return make


class Awaited:
    """A tier whose every call can be awaited: a local tier's plain results come back as they are."""

    def __init__(self, tier):
        self.tier = tier

    def __getattr__(self, name):
        attr = getattr(self.tier, name)
        if not callable(attr):
            return attr

        async def call(*a, **kw):
            out = attr(*a, **kw)
            return await out if inspect.isawaitable(out) else out

        return call


def run(make, body):
    async def main():
        tier = Awaited(make())
        try:
            await body(tier)
        finally:
            await tier.close()

    asyncio.run(main())


def test_round_trip_is_exact(make_tier, tiny_blobs):
    async def body(t):
        for i, b in enumerate(tiny_blobs[:4]):
            await t.put(f"s{i}", b)
        for i, b in enumerate(tiny_blobs[:4]):
            assert await t.contains(f"s{i}")
            assert bytes(await t.get(f"s{i}")) == b
        await t.put("s0", tiny_blobs[4])  # replace
        assert bytes(await t.get("s0")) == tiny_blobs[4]
        assert sorted(await t.keys()) == ["s0", "s1", "s2", "s3"]

    run(make_tier, body)


def test_delete_and_missing_key(make_tier, tiny_blobs):
    async def body(t):
        assert not await t.contains("nope")
        with pytest.raises(CacheMissError):
            await t.get("nope")
        assert await t.delete("nope") is False
        await t.put("a", tiny_blobs[0])
        assert await t.delete("a") is True
        assert not await t.contains("a")
        with pytest.raises(CacheMissError):
            await t.get("a")
        assert await t.keys() == []

    run(make_tier, body)


def test_stats_count_sessions_and_bytes(make_tier, tiny_blobs):
    async def body(t):
        assert (await t.stats()).sessions == 0
        for i, b in enumerate(tiny_blobs[:3]):
            await t.put(f"s{i}", b)
        st = await t.stats()
        assert st.sessions == 3
        expect = 3 * t.tier.slot_bytes() if make_tier.kind == "device" else sum(map(len, tiny_blobs[:3]))
        assert st.bytes == expect
        await t.delete("s1")
        assert (await t.stats()).sessions == 2

    run(make_tier, body)


def test_concurrent_writers_to_different_sessions(make_tier, tiny_blobs):
    async def body(t):
        async def writer(i: int):
            for rep in range(3):  # each writer rewrites its session; the last write wins
                await t.put(f"w{i}", tiny_blobs[(i + rep) % len(tiny_blobs)])

        await asyncio.gather(*(writer(i) for i in range(5)))
        got = await asyncio.gather(*(t.get(f"w{i}") for i in range(5)))
        for i, g in enumerate(got):
            assert bytes(g) == tiny_blobs[(i + 2) % len(tiny_blobs)]

    run(make_tier, body)
