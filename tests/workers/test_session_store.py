"""The worker-side SessionStore on the real default model: exact tokens across tier round trips,
and recovery from the transcript when a cache is lost, corrupt or incompatible."""

from __future__ import annotations

import pytest

from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.errors import CacheMissError, TierUnavailableError
from lessserve.testing.sessions import adopt, forget_cache, snapshot
from lessserve.workers.chat_session import Transcript
from lessserve.workers.local_sessions import LocalSessions
from tests.workers.replay import replayed_reply

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # 2 shared cores: one intra-op thread

QUESTIONS = ["Name a colour.", "Why that one?", "Name a fruit of that colour."]
NEW_TOKENS = 6


def next_messages(history: list[dict], i: int) -> list[dict]:
    return [*history, {"role": "user", "content": QUESTIONS[i]}]


def test_round_trips_between_every_turn_give_the_same_tokens(default_engine, redis_server, prefix):
    """device -> host -> Redis -> device between turns == a session that never left the device."""
    ref_engine, engine = default_engine(), default_engine()
    ref = LocalSessions(ref_engine, StoreConfig(device_idle_s=None, host_idle_s=None))  # never leaves the device
    ss = LocalSessions(engine, StoreConfig(redis_url=redis_server.url, redis_prefix=prefix))
    try:
        ref_hist, hist = [], []
        for i in range(len(QUESTIONS)):
            want = list(ref.turn("chat", next_messages(ref_hist, i), max_new_tokens=NEW_TOKENS))
            got = list(ss.turn("chat", next_messages(hist, i), max_new_tokens=NEW_TOKENS))
            assert got == want
            ref_hist, hist = ref.transcript("chat").messages, ss.transcript("chat").messages
            assert ss.transcript("chat").ids == ref.transcript("chat").ids
            assert ss.where("chat") == "device"
            assert ss.offload("chat", "host") == "host" and ss.where("chat") == "host"
            assert ss.offload("chat", "redis") == "redis" and ss.where("chat") == "redis"
        seen = ref_engine.stats(ref.device.slot_of("chat"))["tokens_seen"]
        assert seen > 3 * ref_engine.spec.budget  # eviction happened
        st = ss.stats()
        assert st["redis"]["restores"] == 2 and st["total"]["recomputes"] == 0
        assert st["redis"]["sessions"] == 1 and st["redis"]["bytes"] > 0
        ss.delete("chat")
        with pytest.raises(CacheMissError):
            ss.where("chat")
        assert ss.stats()["redis"]["sessions"] == 0
    finally:
        ss.close()
        ref.close()


def test_lost_corrupt_and_incompatible_caches_are_rebuilt_from_the_transcript(default_engine, own_redis, prefix):
    cfg = StoreConfig(redis_url=own_redis.url, redis_prefix=prefix, redis_timeout_s=2.0)
    a = LocalSessions(default_engine(), cfg)
    try:
        hist = []
        list(a.turn("s", next_messages(hist, 0), max_new_tokens=NEW_TOKENS))
        hist = a.transcript("s").messages
        ids_after_1 = list(a.transcript("s").ids)

        # 1. Redis crashes while holding the only cache: the worker re-prefills its transcript.
        a.offload("s", "redis")
        own_redis.kill()
        want = replayed_reply(default_engine(), a.transcript("s"), next_messages(hist, 1), NEW_TOKENS)
        reply = "".join(a.turn("s", next_messages(hist, 1), max_new_tokens=NEW_TOKENS))
        assert reply.strip() and reply == want  # the rebuild == an independent replay of the transcript
        assert a.transcript("s").ids[: len(ids_after_1)] == ids_after_1 and a.transcript("s").turns == 2
        st = a.stats()
        assert st["redis"]["recomputes"] == 1 and st["total"]["transcript_write_failures"] == 1
        own_redis.start()
        hist = a.transcript("s").messages

        # 2. A write killed before its pointer flip: the offload fails typed, the cache stays on device.
        real_set = a.store.shared.kv.client.set

        async def set_then_crash(name, *args, **kw):
            if name.endswith(":ptr"):
                own_redis.kill()
            return await real_set(name, *args, **kw)

        a.store.shared.kv.client.set = set_then_crash
        with pytest.raises(TierUnavailableError):
            a.offload("s", "redis")
        a.store.shared.kv.client.set = real_set
        own_redis.start()
        assert a.where("s") == "device"
        a.drain()  # transcript + cache to Redis
        assert a.where("s") == "redis"

        # 3. Flipped bytes in Redis: the checksum refuses the cache, the next turn rebuilds.
        r = a.store.shared
        gen = a.run(r.kv.client.get(f"{prefix}:s:ptr")).decode().split(":")[0]
        a.run(r.kv.client.setrange(f"{prefix}:s:{gen}:0", 5000, b"\x00\xff\x00\xff"))
        want = replayed_reply(default_engine(), a.transcript("s"), next_messages(hist, 2), NEW_TOKENS)
        assert "".join(a.turn("s", next_messages(hist, 2), max_new_tokens=NEW_TOKENS)) == want
        assert a.stats()["redis"]["recomputes"] == 2 and a.transcript("s").turns == 3
        a.drain()

        # 4. Another worker with another budget: the header is refused; it rebuilds from the
        #    transcript it reads from Redis (it never saw this session before).
        b = LocalSessions(default_engine(budget=24), cfg)
        try:
            msgs = [*a.transcript("s").messages, {"role": "user", "content": "Thanks."}]
            want = replayed_reply(default_engine(budget=24), a.transcript("s"), msgs, 2)
            assert "".join(b.turn("s", msgs, max_new_tokens=2)) == want
            assert b.stats()["redis"]["recomputes"] == 1
            assert b.transcript("s").ids[: len(ids_after_1)] == ids_after_1
            assert b.transcript("s").turns == 4
        finally:
            b.close()
    finally:
        a.close()


def test_embedded_default_without_redis(default_engine):
    ss = LocalSessions(default_engine(), StoreConfig())
    try:
        list(ss.turn("x", next_messages([], 0), max_new_tokens=3))
        assert ss.offload("x", "host") == "host"
        with pytest.raises(TierUnavailableError):
            ss.offload("x", "redis")
        list(ss.turn("x", next_messages(ss.transcript("x").messages, 1), max_new_tokens=3))
        st = ss.stats()
        assert "redis" not in st and st["host"]["restores"] == 1 and ss.where("x") == "device"
        forget_cache(ss, "x")  # lost cache, transcript kept: the next turn recomputes
        msgs = next_messages(ss.transcript("x").messages, 2)
        want = replayed_reply(default_engine(), ss.transcript("x"), msgs, 3)
        assert "".join(ss.turn("x", msgs, max_new_tokens=3)) == want
        assert ss.stats()["total"]["recomputes"] == 1
    finally:
        ss.close()


def test_quantized_offload_is_smaller_and_the_conversation_goes_on(default_engine, redis_server, prefix):
    ss = LocalSessions(default_engine(), StoreConfig(redis_url=redis_server.url, redis_prefix=prefix, quantize=True))
    try:
        list(ss.turn("q", next_messages([], 0), max_new_tokens=3))
        small = len(snapshot(ss, "q"))  # snapshot follows the device tier: quantised here
        ss.device.quantize = False
        plain = len(snapshot(ss, "q"))
        ss.device.quantize = True
        assert small < 0.4 * plain  # fp32 k/v -> int8 + one fp32 scale per token
        ss.offload("q", "redis")
        assert ss.stats()["redis"]["bytes"] == small
        reply = "".join(ss.turn("q", next_messages(ss.transcript("q").messages, 1), max_new_tokens=3))
        assert reply.strip() and ss.stats()["redis"]["restores"] == 1
    finally:
        ss.close()


def test_a_cache_without_its_transcript_is_refused(default_engine, redis_server, prefix):
    from lessserve.cache_store.errors import IncompatibleCacheError

    ss = LocalSessions(default_engine(), StoreConfig(redis_url=redis_server.url, redis_prefix=prefix))
    try:
        list(ss.turn("t", next_messages([], 0), max_new_tokens=2))
        ss.device.meta_fn = lambda sid: {}  # a writer that forgot the transcript
        bare = snapshot(ss, "t")
        with pytest.raises(IncompatibleCacheError):
            adopt(ss, "u", bare)
        ss.run(ss.store.shared.put("u", bare))  # what another writer left in the shared tier
        assert ss.where("u") == "redis"
        reply = "".join(ss.turn("u", next_messages([], 1), max_new_tokens=2))
        assert reply.strip() and ss.where("u") == "device" and ss.transcript("u").turns == 1
        assert reply == replayed_reply(default_engine(), Transcript(), next_messages([], 1), 2)  # a fresh start
        assert ss.device.free_slots == 0  # t and u: no slot leaked
    finally:
        ss.close()


def test_without_host_storage_idle_caches_go_straight_to_the_shared_tier(default_engine):
    """host_bytes 0 turns the host tier's storage off: an idle device copy then goes to the shared tier
    (it stayed on the device forever, found through a requirepass cluster test), and comes back."""
    import time

    from lessserve.cache_store.kv import MemoryKV

    ss = LocalSessions(default_engine(max_slots=2), StoreConfig(host_bytes=0, device_idle_s=0.05, host_idle_s=0.05),
                       kv=MemoryKV())
    try:
        msgs = next_messages([], 0)
        list(ss.turn("s", msgs, max_new_tokens=3))
        time.sleep(0.1)
        assert ss.maintain() == 1 and ss.where("s") == "memory"
        assert ss.engine.slab.free_slots == 2  # the device slot was given back
        hist = ss.transcript("s").messages
        list(ss.turn("s", next_messages(hist, 1), max_new_tokens=3))
        st = ss.stats()
        assert st["memory"]["restores"] == 1 and st["total"]["recomputes"] == 0
    finally:
        ss.close()
