"""The session directory's read-merge-write is a compare-and-set: a claim never overwrites one it
did not read (a draining worker's `leave` racing a turn's claim elsewhere; re-publishes racing the
latest turn), over the in-process KV and a real redis-server."""

from __future__ import annotations

import asyncio

import pytest

from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.kv import MemoryKV
from lessserve.cache_store.redis_kv import RedisKV
from lessserve.cluster.directory import DirectoryUnavailableError, SessionDirectory


class RacedKV(MemoryKV):
    """A KV where another writer acts right after each read (`between` runs once per read)."""

    def __init__(self):
        super().__init__()
        self.between = None

    async def _race(self):
        if self.between is not None:
            act, self.between = self.between, None
            await act()

    async def get(self, key):
        out = await super().get(key)
        await self._race()
        return out

    async def get_many(self, keys):
        out = await super().get_many(keys)
        await self._race()
        return out


def test_a_leaving_worker_never_clears_a_claim_made_after_its_read():
    async def main():
        kv = RacedKV()
        d = SessionDirectory(kv, prefix="dir:")
        await d.place("s", "w1", "o", 1)
        await d.place("t", "w1", "o", 1)
        kv.between = lambda: d.place("s", "w2", "o", 2)  # w2 serves s's next turn while w1 drains
        assert await d.leave("w1") == 1  # t left; s was claimed meanwhile and stays w2's
        assert (await d.lookup("s"))["worker"] == "w2" and (await d.lookup("s"))["turns"] == 2
        assert (await d.lookup("t"))["worker"] is None

    asyncio.run(main())


def test_a_stale_republish_racing_the_latest_turn_loses():
    async def main():
        kv = RacedKV()
        d = SessionDirectory(kv, prefix="dir:")
        kv.between = lambda: d.place("s", "w2", "o", 5)  # the latest turn lands between read and write
        assert await d.place("s", "w1", "o", 3, if_newer=True) is None  # retried, then refused
        assert (await d.lookup("s"))["worker"] == "w2"

    asyncio.run(main())


def test_an_entry_that_keeps_changing_is_an_outage_not_a_silent_overwrite():
    async def main():
        kv = RacedKV()
        d = SessionDirectory(kv, prefix="dir:")
        n = 0

        async def meddle():
            nonlocal n
            n += 1
            await kv.set("dir:s", f'{{"worker": "x{n}", "turns": 0}}')
            kv.between = meddle

        kv.between = meddle
        with pytest.raises(DirectoryUnavailableError, match="changed under"):
            await d.place("s", "w1", "o", 1)

    asyncio.run(main())


def test_concurrent_claims_on_redis_keep_the_latest_turn(redis_server):
    async def main():
        kv = RedisKV.from_config(StoreConfig(redis_url=redis_server.url))
        d = SessionDirectory(kv, prefix=f"dir-{id(kv)}:")
        try:
            await asyncio.gather(*(d.place("s", f"w{t}", "o", t, if_newer=True) for t in range(1, 13)))
            e = await d.lookup("s")
            assert e["turns"] == 12 and e["worker"] == "w12" and e["owner"] == "o"
        finally:
            await kv.close()

    asyncio.run(main())


def test_entries_expire_with_their_ttl_and_every_claim_refreshes_it():
    import time as _time

    async def main():
        d = SessionDirectory(MemoryKV(), prefix="dir:", ttl_s=0.3)
        await d.place("s", "w1", "o", 1)
        await asyncio.sleep(0.2)
        await d.place("s", "w1", "o", 2)  # a new turn: the entry lives another ttl
        await asyncio.sleep(0.2)
        assert (await d.lookup("s"))["turns"] == 2
        await d.place("t", "w1", "o", 1)
        assert await d.leave("w1") == 2  # leaving keeps the ttl too
        t0 = _time.monotonic()
        while await d.lookup("t") is not None:
            await asyncio.sleep(0.05)
            assert _time.monotonic() - t0 < 2
        return await d.lookup("s")

    assert asyncio.run(main()) is None  # collected: nobody continued it
