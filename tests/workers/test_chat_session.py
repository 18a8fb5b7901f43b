"""Multi-turn chat on the real default model: later turns prefill only their new tokens."""

from lessserve.workers.chat_session import ChatSession


def test_turns_prefill_only_new_tokens_and_rebuild_on_divergence(default_engine_factory):
    e = default_engine_factory(policy="h2o", budget=32, prefill_chunk=16)
    chat = ChatSession(e)
    msgs = [{"role": "user", "content": "Name a colour."}]
    first = "".join(chat.turn(msgs, max_new_tokens=12))
    assert first.strip()
    tr = chat.transcript
    assert len(tr.ids) == e.slab.seen[chat.slot]  # the transcript is exactly what the cache consumed
    first_prefill = chat.last_prefill
    msgs = [*tr.messages, {"role": "user", "content": "And another one?"}]
    "".join(chat.turn(msgs, max_new_tokens=8))
    assert 0 < chat.last_prefill < 20 < first_prefill + len(tr.ids) // 2
    assert chat.stats()["turns"] == 2 and chat.stats()["cached_tokens"] <= 32
    # An edited earlier message: the session is rebuilt from the new history.
    edited = [{"role": "user", "content": "Name a fruit."}, *chat.transcript.messages[1:]]
    edited.append({"role": "user", "content": "Thanks."})
    "".join(chat.turn(edited, max_new_tokens=4))
    assert chat.last_prefill == e.slab.seen[chat.slot] - 3  # everything but the 3 decoded-and-fed tokens
    chat.close()


def _story(engine) -> str:
    chat = ChatSession(engine)
    msgs = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message."}]
    text = "".join(chat.turn(msgs, max_new_tokens=150))
    assert engine.stats(chat.slot)["tokens_seen"] > 150
    chat.close()
    return text


def test_generate_is_fluent_under_h2o_budget_64(default_engine_factory):
    """Past the budget, h2o@64 stays as varied as the full cache (distinct-word ratio within 20%)."""
    full = _story(default_engine_factory(policy="full", prefill_chunk=32)).split()
    e = default_engine_factory(policy="h2o", budget=64, prefill_chunk=32)
    h2o = _story(e).split()
    assert len(h2o) > 60
    ratio = lambda w: len(set(w)) / len(w)  # noqa: E731
    assert ratio(h2o) > 0.8 * ratio(full) and ratio(h2o) > 0.45
