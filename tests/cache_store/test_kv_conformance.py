"""One conformance suite every shared-state backend (cache_store/kv.py) passes: MemoryKV in this
process, RedisKV over a real redis-server. tests/cluster/test_actor_kv.py runs the same tests
over ActorKV and the real cluster-state actor. Keys live under a fresh namespace per test (the
Redis server is shared by the session)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.kv import KV, MemoryKV
from lessserve.cache_store.redis_kv import RedisKV

KINDS = ["memory", "redis"]


@pytest.fixture(params=KINDS)
def make_kv(request, redis_server):
    """make() -> a KV; called inside the test's own event loop (a Redis client belongs to it)."""
    kind = request.param

    def make() -> KV:
        if kind == "memory":
            return MemoryKV()
        return RedisKV.from_config(StoreConfig(redis_url=redis_server.url, redis_timeout_s=5.0))

    make.kind = kind
    return make


@pytest.fixture
def ns() -> str:
    return f"kvtest:{uuid.uuid4().hex[:8]}:"


def run(make, body):
    async def main():
        kv = make()
        try:
            await body(kv)
        finally:
            await kv.close()

    asyncio.run(main())


def test_set_get_exists_delete(make_kv, ns):
    async def body(kv: KV):
        assert await kv.get(ns + "a") is None and not await kv.exists(ns + "a")
        await kv.set(ns + "a", b"one")
        await kv.set(ns + "b", memoryview(b"xxtwoxx")[2:5])
        await kv.set(ns + "c", "three")
        await kv.set(ns + "empty", b"")
        assert await kv.get(ns + "a") == b"one" and await kv.get(ns + "b") == b"two"
        assert await kv.get(ns + "c") == b"three" and await kv.get(ns + "empty") == b""
        assert await kv.exists(ns + "a") and await kv.exists(ns + "empty")
        await kv.set(ns + "a", b"uno")  # replaced
        assert await kv.get(ns + "a") == b"uno"
        assert await kv.delete(ns + "a", ns + "a", ns + "missing") == 1
        assert await kv.delete() == 0
        assert await kv.get(ns + "a") is None and not await kv.exists(ns + "a")

    run(make_kv, body)


def test_many_at_once_keep_their_order(make_kv, ns):
    async def body(kv: KV):
        assert await kv.get_many([]) == []
        await kv.set_many({})
        await kv.set_many({ns + str(i): bytes([i]) * i for i in range(1, 6)})
        got = await kv.get_many([ns + "3", ns + "nope", ns + "1", ns + "5"])
        assert got == [b"\3" * 3, None, b"\1", b"\5" * 5]

    run(make_kv, body)


def test_swap_and_pop_return_the_previous_value(make_kv, ns):
    async def body(kv: KV):
        assert await kv.swap(ns + "p", b"g1:1:10") is None
        assert await kv.swap(ns + "p", b"g2:1:10") == b"g1:1:10"
        assert await kv.get(ns + "p") == b"g2:1:10"
        assert await kv.pop(ns + "p") == b"g2:1:10"
        assert await kv.pop(ns + "p") is None and not await kv.exists(ns + "p")

    run(make_kv, body)


def test_compare_and_set_writes_only_over_what_it_read(make_kv, ns):
    async def body(kv: KV):
        k = ns + "d"
        assert await kv.cas(k, None, b"v1")  # absent, as expected
        assert not await kv.cas(k, None, b"other") and await kv.get(k) == b"v1"
        assert not await kv.cas(k, b"v0", b"other") and await kv.get(k) == b"v1"  # someone wrote since
        assert await kv.cas(k, "v1", b"v2") and await kv.get(k) == b"v2"
        assert await kv.cas(k, b"v2", b"", ttl_s=0.2) and await kv.get(k) == b""  # an empty value is a value
        assert not await kv.cas(k, None, b"x")
        await asyncio.sleep(0.4)
        assert await kv.get(k) is None and await kv.cas(k, None, b"after")  # expired: absent again
        # racing read-modify-writes: every increment lands exactly once
        await kv.set(ns + "n", b"0")

        async def incr():
            while True:
                cur = await kv.get(ns + "n")
                if await kv.cas(ns + "n", cur, str(int(cur) + 1)):
                    return

        await asyncio.gather(*(incr() for _ in range(20)))
        assert await kv.get(ns + "n") == b"20"

    run(make_kv, body)


def test_ttls_expire_and_a_plain_set_clears_them(make_kv, ns):
    async def body(kv: KV):
        await kv.set(ns + "t", b"x", ttl_s=0.3)
        await kv.set_many({ns + "m1": b"1", ns + "m2": b"2"}, ttl_s=0.3)
        await kv.swap(ns + "s", b"x", ttl_s=0.3)
        await kv.set(ns + "kept", b"x", ttl_s=0.3)
        await kv.set(ns + "kept", b"y")  # no TTL: the earlier one is gone
        await kv.set(ns + "long", b"x", ttl_s=60)
        assert await kv.exists(ns + "t") and await kv.get(ns + "m2") == b"2"
        await asyncio.sleep(0.6)
        for k in ("t", "m1", "m2", "s"):
            assert await kv.get(ns + k) is None and not await kv.exists(ns + k), k
        assert await kv.get_many([ns + "m1", ns + "kept"]) == [None, b"y"]
        assert sorted(await kv.keys(ns)) == [ns + "kept", ns + "long"]
        assert await kv.used(ns) == (2, 2)
        assert await kv.pop(ns + "t") is None and await kv.delete(ns + "m1") == 0

    run(make_kv, body)


def test_keys_by_prefix_and_suffix_bounded_and_literal(make_kv, ns):
    async def body(kv: KV):
        names = ["a:ptr", "a:g1:0", "a:ts", "b:ptr", "b:ts", "ptr", "x*y:ptr", "xzy:ptr", "[q]:ptr"]
        await kv.set_many({ns + n: b"." for n in names})
        assert sorted(await kv.keys(ns)) == sorted(ns + n for n in names)
        assert sorted(await kv.keys(ns, ":ptr")) == sorted(ns + n for n in ["a:ptr", "b:ptr", "x*y:ptr", "xzy:ptr",
                                                                            "[q]:ptr"])
        assert await kv.keys(ns + "x*y") == [ns + "x*y:ptr"]  # glob characters are literal
        assert await kv.keys(ns + "[q]") == [ns + "[q]:ptr"]
        assert await kv.keys(ns + "a:ptr", ":ptr") == []  # prefix and suffix never overlap
        assert await kv.keys(ns + "nothing") == []
        assert len(await kv.keys(ns, limit=3)) == 3
        assert await kv.keys(ns, limit=1000) and set(await kv.keys(ns, limit=1000)) <= {ns + n for n in names}

    run(make_kv, body)


def test_used_counts_keys_and_value_bytes(make_kv, ns):
    async def body(kv: KV):
        assert await kv.used(ns) == (0, 0)
        await kv.set_many({ns + "a": b"x" * 10, ns + "b": b"y" * 32})
        await kv.set(ns + "c", b"z" * 100)
        assert await kv.used(ns) == (3, 142)
        await kv.set(ns + "c", b"z")
        await kv.delete(ns + "a")
        assert await kv.used(ns) == (2, 33)
        keys, nbytes = await kv.used()
        assert keys >= 2 and nbytes >= 33

    run(make_kv, body)


def test_epoch_is_stable_while_the_backend_lives(make_kv):
    async def body(kv: KV):
        e = await kv.epoch()
        assert isinstance(e, str) and e and await kv.epoch() == e

    run(make_kv, body)


def test_large_values_and_concurrent_callers(make_kv, ns):
    big = os.urandom(6 << 20)

    async def body(kv: KV):
        await kv.set(ns + "big", big, ttl_s=60)
        assert await kv.get(ns + "big") == big

        async def writer(i: int):
            for rep in range(3):  # each rewrites its key; the last write wins
                await kv.set(f"{ns}w{i}", f"{i}-{rep}".encode())
            return await kv.get(f"{ns}w{i}")

        got = await asyncio.gather(*(writer(i) for i in range(12)))
        assert got == [f"{i}-2".encode() for i in range(12)]

    run(make_kv, body)


# --- backends that hold their own memory -------------------------------------------------------
def test_memory_caps_keep_the_latest_written(ns):
    async def main():
        kv = MemoryKV()
        await kv.set(ns + "other", b"o")
        for i in range(5):
            await kv.set(f"{ns}r:{i}", b"x")
        await kv.cap(ns + "r:", 3)  # the two oldest go at once
        assert sorted(await kv.keys(ns + "r:")) == [f"{ns}r:{i}" for i in (2, 3, 4)]
        await kv.set(ns + "r:2", b"y")  # rewritten: now the latest
        await kv.set(ns + "r:5", b"x")
        assert sorted(await kv.keys(ns + "r:")) == [f"{ns}r:{i}" for i in (2, 4, 5)]
        assert await kv.exists(ns + "other") and await kv.used() == (4, 4)

    asyncio.run(main())


def test_memory_sweeps_expired_keys_without_reading_them():
    class Clock:
        t = 0.0

        def __call__(self):
            return self.t

    clock = Clock()
    kv = MemoryKV(clock)
    for i in range(2000):
        kv.map.set(f"k{i}", b"x" * 10, ttl_s=1.0 + (i % 2))
    for i in range(2000):  # rewriting keys leaves stale heap entries: the heap stays bounded
        kv.map.set(f"k{i}", b"x" * 10, ttl_s=1.0 + (i % 2))
    assert len(kv.map._heap) <= 2 * 2000 + 1024
    clock.t = 1.5
    kv.map.set("later", b"y")
    assert kv.map.used() == (1001, 10001) and kv.map.bytes == 10001
    clock.t = 5
    assert len(kv.map) == 1 and kv.map.bytes == 1


# --- Redis: one client from StoreConfig, hung and dead servers, password, TLS -------------------
def test_a_hung_redis_fails_every_call_within_the_timeout(own_redis, ns):
    """SIGSTOP: the server keeps its connections open and never answers. Every call must fail
    typed within the deadline (not after the socket timeout plus a retry), and work after SIGCONT."""
    from lessserve.cache_store.errors import TierUnavailableError

    async def main():
        kv = RedisKV.from_config(StoreConfig(redis_url=own_redis.url, redis_timeout_s=0.5))
        await kv.set(ns + "a", b"1")
        calls = {"get": lambda: kv.get(ns + "a"), "get_many": lambda: kv.get_many([ns + "a"]),
                 "set": lambda: kv.set(ns + "a", b"2"), "set_many": lambda: kv.set_many({ns + "a": b"2"}),
                 "swap": lambda: kv.swap(ns + "a", b"2"), "pop": lambda: kv.pop(ns + "b"),
                 "cas": lambda: kv.cas(ns + "a", b"1", b"2"),
                 "delete": lambda: kv.delete(ns + "b"), "exists": lambda: kv.exists(ns + "a"),
                 "keys": lambda: kv.keys(ns), "epoch": kv.epoch, "used": lambda: kv.used(ns)}
        own_redis.pause()
        try:
            for name, call in calls.items():
                t0 = time.monotonic()
                with pytest.raises(TierUnavailableError, match="no answer within 0.5 s"):
                    await call()
                assert time.monotonic() - t0 < 1.5, name
        finally:
            own_redis.resume()
        assert await kv.get(ns + "a") == b"1"  # the cancelled connections were dropped, not reused
        await kv.set(ns + "a", b"3")
        assert await kv.get(ns + "a") == b"3"
        await kv.close()

    asyncio.run(main())


def test_a_dead_redis_fails_typed_and_a_restart_changes_the_epoch(own_redis, ns):
    from lessserve.cache_store.errors import TierUnavailableError

    async def main():
        kv = RedisKV.from_config(StoreConfig(redis_url=own_redis.url, redis_timeout_s=2.0))
        await kv.set(ns + "a", b"1")
        before = await kv.epoch()
        own_redis.kill()
        for call in (kv.get(ns + "a"), kv.set(ns + "a", b"2"), kv.keys(ns), kv.epoch(), kv.swap(ns + "a", b"")):
            with pytest.raises(TierUnavailableError):
                await call
        own_redis.start()  # from its append-only file: same data, another run_id
        assert await kv.get(ns + "a") == b"1" and await kv.epoch() != before
        await kv.close()

    asyncio.run(main())


def test_requirepass_from_the_config_the_url_or_a_file(ns, tmp_path):
    from pydantic import ValidationError

    from lessserve.cache_store.errors import TierUnavailableError
    from lessserve.testing.local_redis import LocalRedis

    with LocalRedis(persist=False, password="s3cr:t@pw") as server:
        async def main():
            good = RedisKV.from_config(StoreConfig(redis_url=server.url, redis_password="s3cr:t@pw"))
            await good.set(ns + "a", b"1")
            url = server.url.replace("redis://", "redis://:s3cr%3At%40pw@")
            in_url = RedisKV.from_config(StoreConfig(redis_url=url))
            assert await in_url.get(ns + "a") == b"1"
            secret = tmp_path / "redis-password"  # a mounted Secret (the chart's store.redis_password_file)
            secret.write_text("s3cr:t@pw\n")
            from_file = RedisKV.from_config(StoreConfig(redis_url=server.url, redis_password_file=str(secret)))
            assert await from_file.get(ns + "a") == b"1"
            await from_file.close()
            for cfg in (StoreConfig(redis_url=server.url), StoreConfig(redis_url=server.url, redis_password="no")):
                bad = RedisKV.from_config(cfg)
                with pytest.raises(TierUnavailableError, match="(?i)auth"):
                    await bad.get(ns + "a")
                await bad.close()
            await good.close()
            await in_url.close()

        asyncio.run(main())
        assert "s3cr" not in repr(StoreConfig(redis_url=server.url, redis_password="s3cr:t@pw"))
        with pytest.raises(ValidationError, match="give the Redis password once"):
            StoreConfig(redis_url=server.url.replace("//", "//:pw@"), redis_password="pw")
        with pytest.raises(ValidationError, match="give the Redis password once"):
            StoreConfig(redis_url=server.url, redis_password="pw", redis_password_file="/x")
        from lessserve.errors.tree import ConfigError

        with pytest.raises(ConfigError, match="redis_password_file"):  # a missing file: one line, named
            StoreConfig(redis_url=server.url, redis_password_file=str(tmp_path / "missing")).password()


def test_tls_through_a_rediss_url(ns, tmp_path):
    """rediss:// speaks TLS: a TLS terminator in front of a plain redis-server (the bundled one is
    built without TLS), with a throwaway self-signed certificate the client is told to trust."""
    from lessserve.cache_store.errors import TierUnavailableError
    from lessserve.testing.local_redis import LocalRedis
    from tests.cache_store.tls_proxy import TlsProxy, self_signed

    cert, key = self_signed(tmp_path)
    with LocalRedis(persist=False) as server, TlsProxy(server.port, cert, key) as proxy:
        async def main():
            url = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={cert}&ssl_check_hostname=false"
            kv = RedisKV.from_config(StoreConfig(redis_url=url))
            await kv.set(ns + "a", b"over tls")
            assert await kv.get(ns + "a") == b"over tls" and proxy.connections >= 1
            await kv.close()
            plain = RedisKV.from_config(StoreConfig(redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                                                    redis_timeout_s=1.0))
            with pytest.raises(TierUnavailableError):  # plain text to a TLS port fails typed
                await plain.get(ns + "a")
            await plain.close()

        asyncio.run(main())


def test_a_byte_capped_map_evicts_cache_copies_first_then_refuses():
    """The state actor's map without Redis: past max_bytes the least recently written cache copies go
    (their sessions rebuild from transcripts); transcripts, directory entries and response records
    never do: a write that cannot fit is refused, typed, and nothing else changes."""
    from lessserve.cache_store.kv import KVFullError, KVMap
    from lessserve.cache_store.shared_tier import cache_keys

    part = lambda sid, g: f"p:{sid}:{g * 16}:0"  # noqa: E731 - a cache part's key
    evictable = cache_keys("p")
    assert evictable(part("s", "a")) and evictable("p:s:ptr") and evictable(part("a:b:ts", "c"))
    assert not evictable("p:s:ts") and not evictable("p:x:ptr:ts") and not evictable("lessserve:resp:r")
    m = KVMap(max_bytes=1000, evictable=evictable)
    m.set("p:s1:ts", b"t" * 300)
    m.set("lessserve:resp:r1", b"r" * 300)
    m.set(part("s1", "a"), b"c" * 200)
    m.set("p:s1:ptr", b"x")
    m.set(part("s2", "b"), b"c" * 199)
    assert m.bytes == 1000 and m.evicted_keys == 0
    m.set("lessserve:directory:s", b"d" * 150)  # over by 150: the oldest cache copy goes
    assert m.get(part("s1", "a")) is None and m.get("p:s1:ts") == b"t" * 300
    assert m.evicted_keys == 1 and m.evicted_bytes == 200 and m.bytes == 950
    m.set(part("s2", "b"), b"c" * 250)  # a copy rewritten: the most recent now; the old pointer goes for it
    assert m.get("p:s1:ptr") is None and m.get(part("s2", "b")) == b"c" * 250 and m.bytes == 1000
    with pytest.raises(KVFullError, match="not written"):
        m.set("lessserve:resp:r2", b"r" * 300)  # evicting every copy would not make room: refused at once
    assert m.get("lessserve:resp:r2") is None and m.refused_writes == 1
    assert m.get(part("s2", "b")) == b"c" * 250 and m.bytes == 1000  # nothing evicted for nothing
    m.set("lessserve:resp:r2", b"r" * 200)  # fits once the copy goes
    assert m.get(part("s2", "b")) is None and m.get("lessserve:resp:r1") == b"r" * 300 and m.bytes == 950
