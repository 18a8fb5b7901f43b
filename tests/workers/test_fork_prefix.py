"""Forks and shared prefixes on the real default model: a fork copies one compressed slot and then
lives its own life (its sibling never sees its tokens); a new conversation that opens with a known
system prompt starts from a copy of that prompt's state, prefilled once per worker."""

from lessserve.cache_store.config import StoreConfig
from lessserve.workers.local_sessions import LocalSessions

SYSTEM = ("You are a terse assistant for a harbour office. Answer in one short sentence, name ships exactly, "
          "and never invent timetables. ") * 3


def store(default_engine, slots=4):
    return LocalSessions(default_engine(max_slots=slots), StoreConfig(device_idle_s=None, host_idle_s=None))


def test_a_fork_is_a_slot_copy_and_branches_stay_apart(default_engine):
    ss = store(default_engine)
    try:
        base = [{"role": "user", "content": "Name a colour."}]
        list(ss.turn("a", base, max_new_tokens=5))
        hist = ss.transcript("a").messages
        assert ss.fork("a", "b")
        eng = ss.engine
        sa, sb = ss.device.slot_of("a"), ss.device.slot_of("b")
        for f in ("k", "v", "pos", "score", "length"):
            x = getattr(eng.slab, f)
            assert (x[:, sa] == x[:, sb]).all() if f != "length" else x[sa] == x[sb]
        ra = "".join(ss.turn("a", [*hist, {"role": "user", "content": "Why that one?"}], max_new_tokens=6))
        rb = "".join(ss.turn("b", [*hist, {"role": "user", "content": "Name a fruit."}], max_new_tokens=6))
        assert ss.sessions["b"].last_prefill < 20  # the branch prefilled only its new message
        # each branch equals a conversation that never forked
        for sid, msg, got in (("a", "Why that one?", ra), ("b", "Name a fruit.", rb)):
            ref = f"ref-{sid}"
            list(ss.turn(ref, base, max_new_tokens=5))
            want = "".join(ss.turn(ref, [*ss.transcript(ref).messages, {"role": "user", "content": msg}],
                                   max_new_tokens=6))
            ss.delete(ref)
            assert got == want, sid
        assert ss.transcript("a").messages[-2]["content"] == "Why that one?"
        assert ss.transcript("b").messages[-2]["content"] == "Name a fruit."
        assert not ss.fork("nobody", "c") and not ss.fork("a", "b")  # nothing to copy; dst exists
    finally:
        ss.close()


def test_new_sessions_with_a_shared_system_prompt_start_from_its_copy(default_engine):
    ss = store(default_engine)
    try:
        prefilled = []
        for i, q in enumerate(["Which ship left first?", "Is the ferry late?", "Name a harbour."]):
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
            reply = "".join(ss.turn(f"s{i}", msgs, max_new_tokens=4))
            assert reply.strip()
            prefilled.append(ss.sessions[f"s{i}"].last_prefill)
            assert ss.transcript(f"s{i}").owner is None and ss.transcript(f"s{i}").turns == 1
        full = len(ss.transcript("s0").ids)
        st = ss.stats()["total"]
        # the first session prefilled the prompt in its own turn (chunked by the scheduler) and left a
        # copy the moment its slot held exactly the prompt; the next two started from that copy
        assert st["prefix_builds"] == 1 and st["prefix_hits"] == 2
        assert all(p < full / 3 for p in prefilled), (prefilled, full)  # only the user message, not the prompt
        assert not any(k.startswith("~") for k in ss.resident())
    finally:
        ss.close()
