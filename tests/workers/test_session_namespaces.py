"""Session-id namespaces in the SessionStore (workers/session_ids.py), on the real default model: a
response's session is durable like a client's (its transcript reaches the store's transcript tier,
it is resident and republished), a worker's private helper sessions never are. Response sessions
("~r-") once fell under the worker's private "~" prefix and lost all three."""

from __future__ import annotations

import pytest

from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.errors import CacheMissError
from lessserve.workers.local_sessions import LocalSessions
from lessserve.workers.session_ids import private_session, response_session

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = ("You are a terse assistant for a harbour office. Answer in one short sentence, name ships exactly, "
          "and never invent timetables. ") * 3


def durable(ss: LocalSessions, sid: str) -> dict | None:
    try:
        return ss.run(ss.store.get_transcript(sid))
    except CacheMissError:
        return None


def test_response_sessions_are_durable_and_private_ones_are_not(default_engine):
    ss = LocalSessions(default_engine(max_slots=4), StoreConfig(device_idle_s=None, host_idle_s=None))
    try:
        resp = response_session("resp_" + "ab" * 12)
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which ship left first?"}]
        list(ss.turn(resp, msgs, max_new_tokens=3))
        list(ss.turn("chat-1", [{"role": "user", "content": "Hi."}], max_new_tokens=3))
        saved = durable(ss, resp)
        assert saved is not None and saved["turns"] == 1 and saved["ids"] == ss.transcript(resp).ids
        assert durable(ss, "chat-1")["turns"] == 1
        helpers = [sid for sid in ss.sessions if sid.startswith("~w-prefix-")]
        assert len(helpers) == 1 and durable(ss, helpers[0]) is None  # the shared system prompt's state
        assert set(ss.resident()) == {resp, "chat-1"}

        ss.run(ss.store.transcripts.delete(resp))  # the durable tier lost it (e.g. Redis restarted)
        ss.run(ss.store.transcripts.delete("chat-1"))
        assert ss.republish(list(ss.resident())) == 2 and durable(ss, resp)["turns"] == 1

        oneoff = private_session("oneoff", "x")
        list(ss.turn(oneoff, [{"role": "user", "content": "Hi."}], max_new_tokens=2))
        assert durable(ss, oneoff) is None and oneoff not in ss.resident()
    finally:
        ss.close()
