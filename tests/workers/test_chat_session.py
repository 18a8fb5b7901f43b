"""Multi-turn chat on the real default model: later turns prefill only their new tokens."""

from lessserve.cache_store.config import StoreConfig
from lessserve.workers.local_sessions import LocalSessions

KEEP = StoreConfig(device_idle_s=None, host_idle_s=None)  # the session stays in its device slot


def test_turns_prefill_only_new_tokens_and_rebuild_on_divergence(default_engine_factory):
    e = default_engine_factory(policy="h2o", budget=32, prefill_chunk=16)
    with LocalSessions(e, KEEP) as ss:
        msgs = [{"role": "user", "content": "Name a colour."}]
        first = "".join(ss.turn("c", msgs, max_new_tokens=12))
        assert first.strip()
        chat = ss.sessions["c"]
        tr = chat.transcript
        assert len(tr.ids) == e.slab.seen[chat.slot]  # the transcript is exactly what the cache consumed
        first_prefill = chat.last_prefill
        msgs = [*tr.messages, {"role": "user", "content": "And another one?"}]
        "".join(ss.turn("c", msgs, max_new_tokens=8))
        assert 0 < chat.last_prefill < 20 < first_prefill + len(tr.ids) // 2
        assert chat.stats()["turns"] == 2 and chat.stats()["cached_tokens"] <= 32
        # An edited earlier message: the session is rebuilt from the new history.
        edited = [{"role": "user", "content": "Name a fruit."}, *chat.transcript.messages[1:]]
        edited.append({"role": "user", "content": "Thanks."})
        "".join(ss.turn("c", edited, max_new_tokens=4))
        assert chat.last_prefill == e.slab.seen[chat.slot] - 3  # everything but the 3 decoded-and-fed tokens


def _story(engine) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids) of a 150-token story, greedy."""
    with LocalSessions(engine, KEEP) as ss:
        msgs = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message."}]
        "".join(ss.turn("story", msgs, max_new_tokens=150))
        chat = ss.sessions["story"]
        assert engine.stats(chat.slot)["tokens_seen"] > 150
        ids, n_prompt = list(chat.transcript.ids), chat.last_prefill
        ss.delete("story")
    return ids[:n_prompt], ids[n_prompt:]


def _nll(engine, prompt: list[int], gen: list[int]) -> float:
    """Mean negative log-likelihood (nats) of `gen` after `prompt` under `engine` (the full cache)."""
    import torch

    slot = engine.alloc()
    logits = engine.prefill(slot, prompt + gen, all_logits=True)[len(prompt) - 1 : -1].float()  # [G, V]
    engine.free(slot)
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(gen)))


def _repeated_4grams(words: list[str]) -> float:
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return 1 - len(set(grams)) / len(grams)


def test_generate_is_fluent_under_h2o_budget_64(default_engine_factory):
    """Past the budget, h2o@64 writes text the full-cache model itself finds likely (its NLL under
    the full model within 0.5 nats/token of the full model's own greedy story, far from the ~10 of
    random tokens), as varied as the full cache's and without loops (repeated 4-grams)."""
    full_engine = default_engine_factory(policy="full", prefill_chunk=32)
    prompt, full = _story(full_engine)
    tok = full_engine.tokenizer
    e = default_engine_factory(policy="h2o", budget=64, prefill_chunk=32)
    p2, h2o = _story(e)
    assert p2 == prompt and len(h2o) > 100
    nll_full, nll_h2o = _nll(full_engine, prompt, full), _nll(full_engine, prompt, h2o)
    assert nll_h2o < nll_full + 0.5, (nll_h2o, nll_full)
    words_full, words_h2o = tok.decode(full).split(), tok.decode(h2o).split()
    assert len(words_h2o) > 60
    ratio = lambda w: len(set(w)) / len(w)  # noqa: E731
    assert ratio(words_h2o) > 0.8 * ratio(words_full) and ratio(words_h2o) > 0.45
    assert _repeated_4grams(words_h2o) < 0.1, tok.decode(h2o)
