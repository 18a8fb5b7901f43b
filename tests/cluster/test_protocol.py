"""The router-worker protocol (cluster/protocol.py): the session-id namespaces, the turn request,
and events that cross Ray intact and as cheaply as the dicts they replace."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from lessserve.cluster.http_errors import HttpError
from lessserve.cluster.openai_types import SESSION_ID_PATTERN as CHAT_PATTERN
from lessserve.cluster.protocol import (
    SESSION_ID_PATTERN,
    EndEvent,
    ErrorEvent,
    StartEvent,
    TokenEvent,
    TurnRequest,
    is_client_id,
    is_durable,
    namespace,
    private_session,
    response_session,
    scoped_session,
)
from lessserve.cluster.responses_types import response_id


def test_three_namespaces_no_client_can_reach_the_other_two():
    rid = response_id()
    assert response_session(rid) == "~r-" + rid[5:]  # the name stored records carry
    assert namespace("chat-1") == "client" and namespace(response_session(rid)) == "response"
    assert namespace(private_session("prefix", "ab12")) == "private"
    for sid in (response_session(rid), private_session("oneoff", "x")):
        assert not is_client_id(sid)
    assert is_durable("chat-1") and is_durable(response_session(rid)) and not is_durable(private_session("p", "k"))
    for bad in ("", "a b", "s\n", "x" * 129):
        with pytest.raises(ValueError):
            namespace(bad)
    assert CHAT_PATTERN is SESSION_ID_PATTERN  # one definition


def test_a_client_id_under_a_key_is_its_own_durable_session():
    from lessserve.cluster.auth import owner_of
    from lessserve.cluster.protocol import client_id

    a, b = owner_of("Bearer k1", {"k1"}), owner_of("Bearer k2", {"k2"})
    for cid in ("s", "A-z_0.9:x", "with-dashes-in-it", "x" * 128):
        sa, sb = scoped_session(a, cid), scoped_session(b, cid)
        assert sa != sb and namespace(sa) == namespace(sb) == "keyed" and is_durable(sa)
        assert client_id(sa) == client_id(sb) == cid and not is_client_id(sa)  # no client can name it
        assert TurnRequest(session_id=sa, owner=a, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert scoped_session("anonymous", "s") == "s"  # open mode: ids are the sessions' own
    for bad in ("~k-", "~k-abc", "~k-abc-", "~k-abc-a b"):
        with pytest.raises(ValueError):
            namespace(bad)


def test_a_turn_request_names_no_private_session():
    base = {"owner": "o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    req = TurnRequest(session_id="~r-abc", fork_from="~r-parent", **base)
    assert req.affinity == "~r-parent" and TurnRequest(session_id="s", **base).affinity == "s"
    assert TurnRequest(**base).affinity is None and TurnRequest(**base).stop == []
    for field in ("session_id", "fork_from"):
        with pytest.raises(ValidationError):
            TurnRequest(**{field: private_session("prefix", "x")}, **base)
    with pytest.raises(ValidationError):
        TurnRequest(**{**base, "max_tokens": -1})
    with pytest.raises(ValidationError):
        TurnRequest(**base, best_of=2)  # extra="forbid": a field the worker would ignore is a router bug
    with pytest.raises(ValidationError, match="either messages"):
        TurnRequest(**base, prompt="both")
    with pytest.raises(ValidationError, match="either messages"):
        TurnRequest(owner="o", max_tokens=1)
    with pytest.raises(ValidationError, match="no session"):
        TurnRequest(owner="o", max_tokens=0, prompt=[1, 2], session_id="s")
    assert TurnRequest(owner="o", max_tokens=0, prompt=[1, 2]).prompt == [1, 2]
    assert pickle.loads(pickle.dumps(req)) == req


def test_events_cross_ray_intact_and_small():
    evs = [StartEvent(12, 3), TokenEvent("hello"), EndEvent("stop", 1),
           ErrorEvent(HttpError(503, "server_busy", "capacity", "busy", retry_after=2))]
    for ev in evs:
        back = pickle.loads(pickle.dumps(ev))
        assert back == ev and back.type == type(ev).type
    assert [e.type for e in evs] == ["start", "token", "end", "error"]
    token = len(pickle.dumps(TokenEvent("hello"), protocol=5))
    assert token <= len(pickle.dumps({"type": "token", "text": "hello"}, protocol=5)) + 64
    assert not hasattr(TokenEvent("x"), "__dict__")  # slots: no per-event dict
