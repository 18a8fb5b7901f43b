"""Exact restores: a session's slot after a round trip through host memory or Redis is the slot
before it left, bit for bit (with int8 offload: k and v equal the quantise / dequantise of the
original, every other field bit for bit), and a rebuild from the transcript equals an independent
replay of that transcript through the same chunking. Default model with its shipped LESS weights
(the H and z state round-trips too), budget 16 so that eviction and absorption have happened."""

from __future__ import annotations

import pytest

from lessserve.cache_store.config import StoreConfig
from lessserve.testing.sessions import adopt, forget_cache, snapshot
from lessserve.workers.local_sessions import LocalSessions
from lessserve.workers.scheduler import SamplingParams
from tests.workers.replay import assert_same_state, int8_round_trip, replay

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["Name a colour.", "Why that one? Answer in one sentence.", "Name a fruit."]


def talk(ss: LocalSessions, sid: str, turns: int, new_tokens: int = 5) -> None:
    msgs: list[dict] = []
    for i in range(turns):
        msgs = [*msgs, {"role": "user", "content": QUESTIONS[i]}]
        list(ss.turn(sid, msgs, max_new_tokens=new_tokens))
        msgs = ss.transcript(sid).messages


def slot_state(ss: LocalSessions, sid: str) -> dict:
    return ss.engine.slab.export(ss.device.slot_of(sid))


@pytest.mark.parametrize("policy", ["h2o+less", "lambda+less"])
def test_offload_and_restore_is_bit_exact(default_engine, redis_server, prefix, policy):
    ss = LocalSessions(default_engine(policy=policy, max_slots=2),
                      StoreConfig(redis_url=redis_server.url, redis_prefix=prefix, keep_redis_copy=False))
    try:
        talk(ss, "s", 2)
        first = slot_state(ss, "s")
        assert int(first["seen"][0]) > 3 * ss.engine.spec.budget and float(first["z"].abs().sum()) > 0
        for quant in (False, True):
            ss.device.quantize = quant
            for tier in ("host", "redis"):
                before = slot_state(ss, "s")
                assert ss.offload("s", tier) == tier and ss.where("s") == tier
                assert ss.restore("s") == tier and ss.where("s") == "device"
                want = int8_round_trip(before) if quant else before
                assert_same_state(slot_state(ss, "s"), want, f"{policy} via {tier}, int8={quant}")
        # after four round trips the session goes on from its restored slot, not from a rebuild
        talk(ss, "s", 3)
        assert ss.stats()["total"]["recomputes"] == 0
    finally:
        ss.close()


def test_rebuild_from_the_transcript_equals_an_independent_replay(default_engine, redis_server, prefix):
    """The cache is lost; the next turn's rebuild re-prefills the transcript inside the turn's own
    request (chunked by the scheduler): the moment its slot has consumed the transcript, it is the
    slot a fresh engine gets by consuming the same ids through the same chunk cuts."""
    ss = LocalSessions(default_engine(policy="h2o+less", max_slots=2, prefill_chunk=13),
                      StoreConfig(redis_url=redis_server.url, redis_prefix=prefix))
    other = default_engine(policy="h2o+less", max_slots=2, prefill_chunk=13)
    try:
        talk(ss, "r", 2)
        ids = list(ss.transcript("r").ids)
        forget_cache(ss, "r")
        msgs = [*ss.transcript("r").messages, {"role": "user", "content": QUESTIONS[2]}]
        chat, new_ids = ss.open_turn("r", msgs, max_new_tokens=4)  # rebuilds, then plans the new ids
        gen: list[int] = []
        try:
            assert ss.stats()["total"]["recomputes"] == 1 and new_ids[: len(ids)] == ids and len(new_ids) > len(ids)
            assert ss.engine.slab.seen[chat.slot] == 0  # nothing prefilled at open: the turn's request does it
            rebuilt = []
            assert len(ids) in chat.marks  # a chunk ends where the transcript does
            chat.marks[len(ids)] = lambda: rebuilt.append(ss.engine.slab.export(chat.slot))
            list(ss.scheduler.stream(chat.slot, new_ids, SamplingParams(max_new_tokens=4), gen, chat.marks))
            want = other.slab.export(replay(other, ids))
            assert len(rebuilt) == 1
            assert_same_state(rebuilt[0], want, "rebuild vs replay")
        finally:
            ss.close_turn("r", msgs, gen)
        assert ss.transcript("r").ids[: len(ids)] == ids and ss.transcript("r").turns == 3
    finally:
        ss.close()


@pytest.mark.parametrize("bits", ["8", "4"])
def test_a_quantised_session_moves_to_another_worker_bit_for_bit(default_engine, redis_server, prefix, bits):
    """Quantised slots (h2o+less, kv_bits 8 / 4) leave one worker through a real Redis and another
    worker's next turn restores them (no rebuild, no second quantisation even with int8 offload on):
    its slot after the turn is, bit for bit, the slot a third worker reaches from the snapshot that
    left (codes, scales, key centre, H and z)."""
    store = StoreConfig(redis_url=redis_server.url, redis_prefix=prefix, keep_redis_copy=False)
    workers = [LocalSessions(default_engine(policy="h2o+less", kv_bits=bits, max_slots=2), store)
               for _ in range(3)]
    a, b, c = workers
    try:
        for w in workers:
            w.device.quantize = True
        talk(a, "s", 2)
        left = snapshot(a, "s")
        assert int(slot_state(a, "s")["seen"][0]) > 3 * a.engine.spec.budget
        msgs = [*a.transcript("s").messages, {"role": "user", "content": QUESTIONS[2]}]
        assert a.offload("s", "redis") == "redis"
        got = "".join(b.turn("s", msgs, max_new_tokens=3))
        st = b.stats()
        assert st["total"]["recomputes"] == 0 and st["redis"]["restores"] == 1, st
        adopt(c, "s", left)
        want = "".join(c.turn("s", msgs, max_new_tokens=3))
        assert got == want
        assert_same_state(slot_state(b, "s"), slot_state(c, "s"), f"kv_bits {bits} moved through Redis",
                          [*a.engine.slab.fields, "length", "seen"])
    finally:
        for w in workers:
            w.close()
