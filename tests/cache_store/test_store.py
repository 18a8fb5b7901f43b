"""TieredCacheStore movement, eviction, pinning and stats, over a fake device tier (no model)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lessserve.cache_store import codec
from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.errors import (
    CacheMissError,
    ChecksumError,
    RestoreError,
    SessionPinnedError,
    TierFullError,
)
from lessserve.cache_store.host_tier import HostTier
from lessserve.cache_store.lru import LRU
from lessserve.cache_store.redis_kv import RedisKV
from lessserve.cache_store.store import TieredCacheStore
from lessserve.cache_store.tier import DeviceTier, TierStats

ID = codec.CacheIdentity(model="fake", policy="h2o", budget=8, less_weights="none")


class FakeDevice(DeviceTier):
    """N slots holding decoded tensors; put decodes (so corrupt bytes are refused as on a real device)."""

    def __init__(self, slots: int = 2):
        self.n, self.held = slots, {}

    @property
    def free_slots(self) -> int:
        return self.n - len(self.held)

    def slot_bytes(self) -> int:
        return 1000

    def place(self, sid: str, value: float) -> None:
        assert self.free_slots > 0 or sid in self.held
        self.held[sid] = {"x": torch.full((250,), float(value))}

    def contains(self, sid):
        return sid in self.held

    def get(self, sid):
        if sid not in self.held:
            raise CacheMissError(sid)
        return codec.encode(self.held[sid], ID, {"sid": sid})

    def put(self, sid, blob):
        tensors = codec.decode(blob, ID).tensors
        if sid not in self.held and self.free_slots == 0:
            raise TierFullError("no slot")
        self.held[sid] = {k: v.clone() for k, v in tensors.items()}

    def delete(self, sid):
        return self.held.pop(sid, None) is not None

    def keys(self):
        return list(self.held)

    def stats(self):
        return TierStats(sessions=len(self.held), bytes=1000 * len(self.held))


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


BLOB = len(codec.encode({"x": torch.zeros(250)}, ID, {"sid": "s0"}))


def make_store(redis_url=None, prefix="t", slots=2, host_sessions=8, clock=None, **cfg):
    dev = FakeDevice(slots)
    kv = RedisKV.from_config(StoreConfig(redis_url=redis_url)) if redis_url else None
    config = StoreConfig(host_bytes=host_sessions * (BLOB + 64), redis_url=None, redis_prefix=prefix, ttl_s=60, **cfg)
    return TieredCacheStore(config, dev, kv=kv, clock=clock or Clock()), dev


async def new_session(store, dev, sid, value):
    await store.make_room()
    dev.place(sid, value)
    store.admit(sid)


def test_lru_policy_skips_pinned_and_orders_by_use():
    clock = Clock()
    p = LRU(clock)
    for i, s in enumerate("abc"):
        clock.t = i
        p.touch(s)
    clock.t = 10
    p.touch("a")
    assert p.victims() == ["b", "c", "a"]
    assert p.victims(pinned={"b"}) == ["c", "a"]
    assert p.idle(8.0) == ["b", "c"] and p.idle(9.0) == ["b"]


def test_down_and_up_through_every_tier(redis_server, prefix):
    async def main():
        store, dev = make_store(redis_server.url, prefix)
        await new_session(store, dev, "a", 1.5)
        assert await store.where("a") == "device"
        assert await store.offload("a", "host") == "host" and await store.where("a") == "host"
        assert await store.offload("a", "redis") == "redis" and await store.where("a") == "redis"
        assert not dev.held and store.host.keys() == []
        r = await store.restore("a")
        assert r.source == "redis" and r.meta == {"sid": "a"}
        assert await store.where("a") == "device" and torch.equal(dev.held["a"]["x"], torch.full((250,), 1.5))
        assert await store.shared.contains("a")  # kept as a durable fallback (keep_redis_copy)
        await store.offload("a", "host")
        assert (await store.restore("a")).source == "host"
        assert (await store.restore("a")).source == "device"
        st = await store.stats()
        assert st["redis"]["restores"] == 1 and st["host"]["restores"] == 1 and st["device"]["hits"] == 1
        assert st["device"]["sessions"] == 1 and st["host"]["sessions"] == 0
        with pytest.raises(CacheMissError):
            await store.where("nobody")
        with pytest.raises(RestoreError) as e:
            await store.restore("nobody")
        assert isinstance(e.value.__cause__, CacheMissError) and e.value.tier == "redis"
        await store.close()

    asyncio.run(main())


def test_restore_can_move_the_redis_copy_instead(redis_server, prefix):
    async def main():
        store, dev = make_store(redis_server.url, prefix, keep_redis_copy=False)
        await new_session(store, dev, "a", 1)
        await store.offload("a", "redis")
        await store.restore("a")
        assert not await store.shared.contains("a") and await store.where("a") == "device"
        await store.close()

    asyncio.run(main())


def test_slots_running_short_evict_lru_unpinned_to_host():
    async def main():
        store, dev = make_store(slots=2)
        await new_session(store, dev, "a", 1)
        await new_session(store, dev, "b", 2)
        store.lru["device"].touch("a")  # a used after b: b is the LRU
        await new_session(store, dev, "c", 3)
        assert await store.where("b") == "host" and await store.where("a") == "device"
        store.pin("c")
        store.pin("a")
        with pytest.raises(TierFullError):
            await new_session(store, dev, "d", 4)
        with pytest.raises(SessionPinnedError):
            await store.offload("a", "host")
        store.unpin("a")
        await store.restore("b")  # evicts a (c is pinned)
        assert await store.where("a") == "host" and await store.where("c") == "device"

    asyncio.run(main())


def test_host_pressure_spills_lru_to_redis(redis_server, prefix):
    async def main():
        store, dev = make_store(redis_server.url, prefix, slots=1, host_sessions=2)
        for i in range(4):
            await new_session(store, dev, f"s{i}", i)
        # s0..s2 went to host as slots ran short; the host holds 2: s0 spilled to redis
        assert [await store.where(f"s{i}") for i in range(4)] == ["redis", "host", "host", "device"]
        await store.restore("s0")
        assert torch.equal(dev.held["s0"]["x"], torch.full((250,), 0.0))
        await store.close()

    asyncio.run(main())


def test_host_pressure_without_redis_drops_lru_and_counts_miss():
    async def main():
        store, dev = make_store(slots=1, host_sessions=1)
        for i in range(3):
            await new_session(store, dev, f"s{i}", i)
        assert await store.where("s1") == "host"
        with pytest.raises(RestoreError) as e:
            await store.restore("s0")
        assert isinstance(e.value.cause, CacheMissError)
        with pytest.raises(TierFullError):  # bigger than the whole host tier, and no redis
            big, d2 = make_store(slots=1, host_sessions=0)
            await new_session(big, d2, "x", 1)
            await big.offload("x", "host")

    asyncio.run(main())


def test_a_cache_bigger_than_host_goes_to_redis(redis_server, prefix):
    async def main():
        store, dev = make_store(redis_server.url, prefix, host_sessions=0)
        await new_session(store, dev, "a", 1)
        assert await store.offload("a", "host") == "redis"
        await store.close()

    asyncio.run(main())


def test_drain_and_idle_maintenance(redis_server, prefix):
    async def main():
        clock = Clock()
        store, dev = make_store(redis_server.url, prefix, slots=3, clock=clock, device_idle_s=10, host_idle_s=100)
        for s in "abc":
            await new_session(store, dev, s, 1)
        clock.t = 5
        store.touch("c")
        clock.t = 12
        assert await store.maintain() == 2  # a and b idle 12 s > 10 s
        assert await store.where("a") == "host" and await store.where("c") == "device"
        clock.t = 200
        assert await store.maintain() == 3  # c to host; a, b idle on host -> redis
        assert await store.where("a") == "redis" and await store.where("c") == "host"
        await new_session(store, dev, "d", 2)
        store.pin("d")
        assert await store.drain() == 1  # c; d is pinned
        assert await store.where("c") == "redis" and await store.where("d") == "device"
        assert (await store.stats())["redis"]["sessions"] == 3
        await store.close()

    asyncio.run(main())


def test_delete_frees_every_tier_and_the_transcript(redis_server, prefix):
    async def main():
        store, dev = make_store(redis_server.url, prefix)
        await new_session(store, dev, "a", 1)
        await store.put_transcript("a", {"ids": [1, 2]})
        await store.offload("a", "redis")
        store.host.put("a", await store.shared.get("a"))  # a stale copy on host too: both go
        await store.delete("a")
        assert not dev.held and store.host.keys() == [] and await store.shared.keys() == []
        with pytest.raises(CacheMissError):
            await store.get_transcript("a")
        await store.close()

    asyncio.run(main())


def test_corrupt_copy_is_refused_and_removed(redis_server, prefix):
    async def main():
        store, dev = make_store(redis_server.url, prefix)
        await new_session(store, dev, "a", 1)
        await store.offload("a", "redis")
        gen = (await store.shared.kv.client.get(f"{prefix}:a:ptr")).decode().split(":")[0]
        await store.shared.kv.client.setrange(f"{prefix}:a:{gen}:0", BLOB - 10, b"\xff\xfe")
        with pytest.raises(RestoreError) as e:
            await store.restore("a")
        assert isinstance(e.value.cause, ChecksumError) and e.value.tier == "redis"
        assert not dev.held and not await store.shared.contains("a")
        store.record_recompute(e.value.tier)
        assert (await store.stats())["redis"]["recomputes"] == 1
        await store.close()

    asyncio.run(main())


def test_host_tier_bound_is_enforced():
    async def main():
        h = HostTier(100)
        h.put("a", b"x" * 60)
        with pytest.raises(TierFullError):
            h.put("b", b"y" * 60)
        h.put("a", b"z" * 100)  # replacing frees the old copy first
        assert h.used == 100 and bytes(h.get("a")) == b"z" * 100

    asyncio.run(main())
