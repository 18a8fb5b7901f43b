"""`+recall` sessions through the worker's SessionStore on the real default model and a real Redis:
the history goes to Redis and back with the session, and when Redis dies holding the only copy
the turn is still served (rebuilt from the transcript, which rebuilds the history too)."""

from __future__ import annotations

import pytest

from lessserve.cache_store.config import StoreConfig
from lessserve.workers.local_sessions import LocalSessions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECALL = dict(policy="h2o+recall", recall_pages=2, recall_page=4, recall_queries=2)
TURNS = ["My locker number is 4417. Please remember it.", "Tell me about the weather today.",
         "What is my locker number?"]


def chat(sessions: LocalSessions, sid: str, n: int) -> list[dict]:
    msgs: list[dict] = []
    for text in TURNS[:n]:
        msgs.append({"role": "user", "content": text})
        reply = "".join(sessions.turn(sid, msgs, max_new_tokens=4))
        msgs.append({"role": "assistant", "content": reply})
    return msgs


def history_of(sessions: LocalSessions, sid: str) -> dict:
    eng = sessions.engine
    return eng.stats(sessions.device.slot_of(sid))


def test_history_travels_through_redis_and_survives_redis_dying(default_engine, own_redis, prefix):
    cfg = StoreConfig(redis_url=own_redis.url, redis_prefix=prefix, redis_timeout_s=2.0)
    a = LocalSessions(default_engine(**RECALL), cfg)
    try:
        msgs = chat(a, "s", 2)
        before = history_of(a, "s")
        assert before["history_tokens"] == before["tokens_seen"] > before["cached_tokens"]
        a.offload("s", "redis")  # the slot and its history leave this worker
        assert not a.engine.histories.by_slot
        a.restore("s")
        after = history_of(a, "s")
        assert after["history_tokens"] == before["history_tokens"] and after["history_bytes"] > 0
        h = a.engine.histories.get(a.device.slot_of("s"))
        assert h.recalled == before["recalled_entries"]

        a.offload("s", "redis")
        own_redis.kill()  # Redis dies holding the only copy of the slot and its history
        msgs.append({"role": "user", "content": TURNS[2]})
        "".join(a.turn("s", msgs, max_new_tokens=4))  # served (rebuilt from the transcript), no error
        assert a.transcript("s").turns == 3
        st = a.stats()
        assert st["redis"]["recomputes"] == 1
        rebuilt = history_of(a, "s")
        assert rebuilt["history_tokens"] == rebuilt["tokens_seen"]  # the re-prefill recorded every token again
        assert rebuilt["recalled_entries"] > 0  # and the question's turn recalled from it
    finally:
        a.close()
