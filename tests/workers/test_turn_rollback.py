"""A turn that produced nothing (its generation failed) is rolled back: the transcript returns to
its state before the turn, this worker's copy of the cache (which holds the failed turn's prefill)
is dropped, and the next turn continues from the transcript, consistent token for token."""

import copy

from lessserve.cache_store.config import StoreConfig
from lessserve.workers.local_sessions import LocalSessions


def test_failed_turn_rolls_back_and_the_next_turn_is_consistent(default_engine):
    eng = default_engine(max_slots=2)
    ss = LocalSessions(eng, StoreConfig(device_idle_s=None, host_idle_s=None))
    try:
        msgs = [{"role": "user", "content": "Name a colour."}]
        list(ss.turn("s", msgs, max_new_tokens=4))
        before = copy.deepcopy(ss.transcript("s").to_dict())
        msgs = [*ss.transcript("s").messages, {"role": "user", "content": "Why?"}]
        chat, new_ids = ss.open_turn("s", msgs, 4)
        eng.prefill(chat.slot, new_ids)  # the turn prefilled, then failed before any token
        ss.close_turn("s", msgs, [])
        assert ss.transcript("s").to_dict() == before
        assert not ss.store.holds("s") and not ss.store.is_pinned("s")
        reply = "".join(ss.turn("s", msgs, max_new_tokens=4))
        tr = ss.transcript("s")
        slot = ss.device.slot_of("s")
        assert reply.strip() and tr.turns == 2 and eng.slab.seen[slot] == len(tr.ids)
    finally:
        ss.close()
