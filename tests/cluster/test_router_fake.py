"""The router's HTTP logic on the CPU, without Ray or a model: the app of cluster/router.py over the
in-memory deps of lessserve.testing.fake_backend (a backend that echoes the last user message).
Validation, the model check, both APIs streamed and not, Responses chains, forks and store: false,
error events and backend errors -> status codes with Retry-After, keys and isolation, the document."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.testclient import TestClient

from lessserve.cluster.auth import owner_of
from lessserve.cluster.config import ServeConfig
from lessserve.cluster.http_errors import ApiError, HttpError
from lessserve.cluster.protocol import TurnRequest, response_session, scoped_session
from lessserve.cluster.router import build_router_app
from lessserve.testing.fake_backend import FakeBackend, StaticHealth, fake_deps
from tests.cluster.bad_requests import BAD_RESPONSES

MODEL = "smollm2-135m-instruct"
KEY_A, KEY_B = "key-a", "key-b"


def make(keys: list[str] | None = None, **over):
    cfg = ServeConfig.model_validate({"api_keys": keys or [], "max_body_bytes": 4096, "max_tokens_limit": 64,
                                      "default_max_tokens": 16, **over})
    deps = fake_deps(FakeBackend())
    return TestClient(build_router_app(cfg, deps), raise_server_exceptions=False), deps


@pytest.fixture
def app():
    return make()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def chat(client, messages, sid=None, headers=None, **body):
    hdr = {**({"X-Session-Id": sid} if sid else {}), **(headers or {})}
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, **body}, headers=hdr)


def sse(text: str) -> list:
    """The data lines of a chat stream, parsed ([DONE] kept as the string)."""
    out = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    return [x if x == "[DONE]" else json.loads(x) for x in out]


def events(text: str) -> list[dict]:
    """The events of a Responses stream."""
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]


# --- chat completions ----------------------------------------------------------------------------
def test_a_whole_reply_and_the_turn_the_worker_is_asked_for(app):
    client, deps = app
    r = chat(client, [{"role": "developer", "content": "be brief"}, user("hi there")], sid="s1", max_tokens=5,
             seed=7, stop="END", temperature=0.5, top_p=0.9)
    assert r.status_code == 200 and r.headers["x-session-id"] == "s1" and r.headers["x-request-id"]
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo hi there "}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert deps.backend.requests == [TurnRequest(
        session_id="s1", owner="anonymous", messages=[{"role": "system", "content": "be brief"}, user("hi there")],
        max_tokens=5, temperature=0.5, top_p=0.9, seed=7, stop=["END"])]
    first = body["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0 and first["completion_tokens"] == 3
    hist = [{"role": "system", "content": "be brief"}, user("hi there"),
            {"role": "assistant", "content": "echo hi there "}, user("and more")]
    second = chat(client, hist, sid="s1").json()["usage"]
    assert second["prompt_tokens_details"]["cached_tokens"] > first["prompt_tokens"]  # the history was cached
    assert deps.backend.requests[-1].max_tokens == 16  # the server's default
    prefilled = second["prompt_tokens"] - second["prompt_tokens_details"]["cached_tokens"]
    assert [rec[2:] for rec in deps.metrics.requests] == [(3, first["prompt_tokens"]), (3, prefilled)]


def test_a_streamed_reply_with_usage(app):
    client, deps = app
    r = chat(client, [user("one two three")], sid="s2", stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and chunks[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:-3]]
    assert "".join(deltas) == "echo one two three " and len(deltas) == 4  # one chunk per token
    assert chunks[-3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 4
    assert len(deps.metrics.requests) == 1 and len(deps.metrics.requests[0][1]) == 3  # TTFT and 3 gaps
    r = chat(client, [user("one two three")], stream=True, max_tokens=2)  # no usage asked, cut by max_tokens
    chunks = sse(r.text)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-2]


def test_a_request_without_a_session_is_a_one_off(app):
    client, deps = app
    r = chat(client, [user("hello")])
    assert r.status_code == 200 and "x-session-id" not in r.headers
    assert deps.backend.requests[0].session_id is None and deps.backend.sessions == {}


# --- the Responses API ---------------------------------------------------------------------------
def create(client, **body):
    return client.post("/v1/responses", json={"model": MODEL, **body})


def test_a_chain_forks_its_parent_and_sends_only_the_history(app):
    client, deps = app
    r1 = create(client, input="name a colour").json()
    assert r1["id"].startswith("resp_") and r1["status"] == "completed"
    assert r1["output"][0]["content"][0]["text"] == "echo name a colour "
    r2 = create(client, input="why that one", previous_response_id=r1["id"]).json()
    req1, req2 = deps.backend.requests
    assert req1.session_id == response_session(r1["id"]) and req1.fork_from is None and not req1.ephemeral
    assert req2.session_id == response_session(r2["id"]) and req2.fork_from == req1.session_id
    assert req2.affinity == req1.session_id  # the follow-up runs where its parent is
    assert req2.messages == [user("name a colour"), {"role": "assistant", "content": "echo name a colour "},
                             user("why that one")]
    assert r2["usage"]["input_tokens_details"]["cached_tokens"] > r1["usage"]["input_tokens"]
    got = client.get(f"/v1/responses/{r2['id']}").json()
    assert got["output"] == r2["output"] and got["previous_response_id"] == r1["id"]
    assert client.delete(f"/v1/responses/{r2['id']}").json()["deleted"] is True
    assert req2.session_id not in deps.backend.sessions  # its cache went with it
    r = client.get(f"/v1/responses/{r2['id']}")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_two_follow_ups_are_two_branches(app):
    client, deps = app
    root = create(client, input="name an animal").json()
    a = create(client, input="where does it live", previous_response_id=root["id"]).json()
    b = create(client, input="what does it eat", previous_response_id=root["id"]).json()
    create(client, input="is it big", previous_response_id=a["id"])
    _, ra, rb, ra2 = deps.backend.requests
    assert ra.fork_from == rb.fork_from == response_session(root["id"]) and ra.session_id != rb.session_id
    assert ra2.fork_from == response_session(a["id"])
    assert user("what does it eat") not in ra2.messages and user("where does it live") in ra2.messages
    assert b["usage"]["input_tokens_details"]["cached_tokens"] > 0


def test_instructions_belong_to_one_response(app):
    client, deps = app
    r1 = create(client, input="hi", instructions="answer in French").json()
    create(client, input="again", previous_response_id=r1["id"])
    first, second = deps.backend.requests
    assert first.messages[0] == {"role": "system", "content": "answer in French"}
    assert all(m["role"] != "system" for m in second.messages)


def test_a_long_chain_of_responses_stores_each_turn_once(app):
    """Records point to their parent: 40 follow-ups store O(n) bytes (each its own turn, every 16th a
    snapshot), and every follow-up still sends the worker the whole conversation."""
    from lessserve.cluster.responses import SNAPSHOT_EVERY

    client, deps = app
    store, rid, sizes = deps.responses, None, []
    for i in range(40):
        r = create(client, input=f"question number {i}", **({"previous_response_id": rid} if rid else {}))
        rid = r.json()["id"]
        sizes.append(len(asyncio.run(store.kv.get(f"{store.prefix}anonymous:{rid}"))))  # keyed by owner
    want = []
    for i, req in enumerate(deps.backend.requests):  # the history the worker got: every earlier turn
        want += [user(f"question number {i}")]
        assert req.messages == want
        want += [{"role": "assistant", "content": f"echo question number {i} "}]  # the fake echoes word by word
    messages, rec = asyncio.run(store.history(rid, "anonymous"))
    assert messages == want and rec["depth"] == 39
    deltas = [n for i, n in enumerate(sizes) if i % SNAPSHOT_EVERY]
    assert max(deltas) < 1.2 * min(deltas)  # a follow-up's record does not grow with the conversation
    assert sum(sizes) < 40 * sizes[1] * 4  # vs the whole history in every record: ~20x the first's
    # an earlier response deleted: the chain cannot be rebuilt past it, and the message says why
    assert client.delete(f"/v1/responses/{rec['previous_response_id']}").status_code == 200
    r = create(client, input="and?", previous_response_id=rid)
    assert r.status_code == 404 and "earlier response" in r.json()["error"]["message"]


def test_store_false_keeps_nothing(app):
    client, deps = app
    gone = create(client, input="say hi", store=False).json()
    assert deps.backend.requests[0].ephemeral and deps.backend.sessions == {}
    r = client.get(f"/v1/responses/{gone['id']}")
    assert r.status_code == 404 and "store: false" in r.json()["error"]["message"]
    r = create(client, input="and", previous_response_id=gone["id"])
    assert r.status_code == 404 and len(deps.backend.requests) == 1


def test_a_streamed_response(app):
    client, _ = app
    r = create(client, input="say hello", stream=True)
    evs = events(r.text)
    types = [e["type"] for e in evs]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    deltas = "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta")
    final = evs[-1]["response"]
    assert deltas == "echo say hello " == final["output"][0]["content"][0]["text"]
    assert client.get(f"/v1/responses/{final['id']}").json()["output"] == final["output"]


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("error,retry", [
    (HttpError(503, "server_busy", "capacity", "every slot is busy", retry_after=2), "2"),
    (HttpError(400, "invalid_request_error", "context_length_exceeded", "the context is 8192"), None),
    (HttpError(404, "not_found_error", "not_found", "session 's' not found"), None),
])
@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_error_before_the_first_token_is_the_status(app, error, retry, api, stream):
    client, deps = app
    deps.backend.fail_next(error)
    r = chat(client, [user("x")], sid="s", stream=stream) if api == "chat" else create(client, input="x", stream=stream)
    assert r.status_code == error.status and r.headers.get("retry-after") == retry
    assert r.json()["error"] == {"message": error.message, "type": error.type, "param": None, "code": error.code}
    assert deps.metrics.errors == [error.status] and deps.metrics.requests == []


def test_an_error_after_the_first_token_is_reported_in_band(app):
    client, deps = app
    busy = HttpError(503, "service_unavailable", "session_unavailable", "tier lost", retry_after=2)
    deps.backend.fail_next(busy, after_tokens=1)
    chunks = sse(chat(client, [user("a b c")], sid="s", stream=True).text)
    assert chunks[1]["choices"][0]["delta"]["content"] == "echo " and chunks[-1] == "[DONE]"
    assert chunks[-2]["error"] == {"message": "generation failed: tier lost", "type": "service_unavailable",
                                   "param": None, "code": "session_unavailable"}
    deps.backend.fail_next(busy, after_tokens=2)
    evs = events(create(client, input="a b c", stream=True).text)
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "session_unavailable"
    assert deps.responses.kv.map.keys() == [] and deps.metrics.requests == []  # nothing kept or counted
    deps.backend.fail_next(busy, after_tokens=1)  # a whole reply: nothing was sent yet, so a status
    r = chat(client, [user("a b c")])
    assert r.status_code == 503 and r.headers["retry-after"] == "2"


def test_a_response_that_ends_before_its_record_is_kept_leaves_no_session(app, monkeypatch):
    """The response's session is forgotten at once when its record is never stored (an error
    mid-stream or mid-collect; a client gone mid-stream takes the same path), and kept otherwise."""
    client, deps = app
    forgotten = []
    real = deps.backend.delete_session

    async def spy(session_id, owner):
        forgotten.append(session_id)
        return await real(session_id, owner)

    monkeypatch.setattr(deps.backend, "delete_session", spy)
    busy = HttpError(503, "service_unavailable", "session_unavailable", "tier lost", retry_after=2)
    deps.backend.fail_next(busy, after_tokens=2)
    evs = events(create(client, input="a b c", stream=True).text)
    assert evs[-1]["type"] == "error"
    deps.backend.fail_next(busy, after_tokens=2)
    assert create(client, input="a b c").status_code == 503
    first, second = (r.session_id for r in deps.backend.requests)
    assert forgotten == [first, second]
    kept = create(client, input="a b c", stream=True)
    assert events(kept.text)[-1]["type"] == "response.completed" and len(forgotten) == 2
    assert create(client, input="x y").status_code == 200 and len(forgotten) == 2
    assert create(client, input="x y", store=False).status_code == 200 and len(forgotten) == 2  # ephemeral anyway


def test_backend_errors_and_bugs(app, monkeypatch):
    client, deps = app

    async def lost(*args, **kw):
        raise ApiError(503, "the worker running this turn went away: RayActorError", "service_unavailable",
                       "worker_unavailable", retry_after=2)

    monkeypatch.setattr(deps.backend, "session_info", lost)
    r = client.get("/v1/sessions/s")
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "worker_unavailable"

    async def bug(*args, **kw):
        raise RuntimeError("a bug")
        yield

    monkeypatch.setattr(deps.backend, "turn", bug)
    r = chat(client, [user("x")], headers={"x-request-id": "req-mine"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-mine"
    assert r.json()["error"]["message"] == "internal error RuntimeError (request id req-mine)"


def test_an_unknown_model_is_404(app):
    client, deps = app
    for r in (chat(client, [user("x")], model="gpt-unknown"), create(client, input="x", model="gpt-unknown")):
        e = r.json()["error"]
        assert r.status_code == 404 and (e["code"], e["param"], e["type"]) == ("model_not_found", "model",
                                                                               "not_found_error")
    assert deps.backend.requests == []


CHAT_BAD = [
    ({"temperature": "0.5"}, "temperature", "temperature: Input should be a valid number"),
    ({"temperature": "hot"}, "temperature", None),
    ({"max_tokens": 5.5}, "max_tokens", None),
    ({"max_tokens": "5"}, "max_tokens", None),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"max_tokens": 65}, "max_tokens", "max_tokens 65 is over this server's limit 64"),
    ({"stream": "yes"}, "stream", None),
    ({"n": 17}, "n", None),
    ({"n": 9}, "n", "n 9 is over this server's 8 slots per worker"),
    ({"n": 0}, "n", None),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", None),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", None),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"logprobs": "yes"}, "logprobs", None),
    ({"top_logprobs": 2}, "top_logprobs", None),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", None),
    ({"top_k": 5}, "top_k", None),  # not an OpenAI field: never silently ignored
    ({"audio": {"voice": "x", "format": "mp3"}}, "audio", None),
    ({"reasoning_effort": "low"}, "reasoning_effort", None),
    ({"frequency_penalty": 0.5}, "frequency_penalty", None),
    ({"logit_bias": {"42": 5}}, "logit_bias", None),
    ({"store": True}, "store", None),
    ({"service_tier": "flex"}, "service_tier", None),
    ({"modalities": ["text", "audio"]}, "modalities", None),
    ({"stream_options": {"include_obfuscation": True}}, "stream_options", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "response_format", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", None),
    ({"response_format": {"type": "yaml"}}, "response_format", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", None),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", None),
    ({"messages": []}, "messages", None),
    ({"messages": "hello"}, "messages", None),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", None),
    ({"session_id": "bad id!"}, "session_id", None),
    ({"seed": 2**64}, "seed", None),
]


@pytest.mark.parametrize("over,field,message", CHAT_BAD)
def test_a_bad_chat_field_is_400_naming_it(app, over, field, message):
    client, deps = app
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [user("x")], **over})
    e = r.json()["error"]
    assert r.status_code == 400 and e["message"].startswith(f"{field}") and e["type"] == "invalid_request_error"
    assert message is None or e["message"] == message
    assert deps.backend.requests == [] and deps.metrics.errors == [400]


@pytest.mark.parametrize("body,field", [
    *BAD_RESPONSES,
    ({"input": "x", "temperature": "0.5"}, "temperature"),
    ({"input": "x", "max_output_tokens": 65}, "max_output_tokens"),
])
def test_a_bad_responses_field_is_400_naming_it(app, body, field):
    client, deps = app
    r = create(client, **body)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), r.text
    assert deps.backend.requests == []


@pytest.mark.parametrize("content,headers,message", [
    (b"{not json", {"content-type": "application/json"}, "malformed JSON body: "),
    (b"[1, 2]", {"content-type": "application/json"}, "the JSON body must be an object"),
    (b"", {"content-type": "application/json"}, "malformed JSON body: the body is empty"),
    (b'{"model": "m"}', {"content-type": "text/plain"}, "the body must be JSON"),
])
def test_a_body_that_is_not_a_json_object_is_400(app, content, headers, message):
    client, _ = app
    r = client.post("/v1/chat/completions", content=content, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(message)


def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(app):
    client, deps = app
    big = json.dumps({"model": MODEL, "messages": [user("x" * 5000)]}).encode()
    r = client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"] == "request body over 4096 bytes"
    r = client.post("/v1/responses", content=iter([big[:3000], big[3000:]]),  # chunked: no content-length
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and deps.backend.requests == [] and deps.metrics.errors == [413, 413]


def test_a_malformed_session_id_is_400(app):
    client, deps = app
    r = chat(client, [user("x")], sid="bad id!")
    assert r.status_code == 400 and r.json()["error"]["param"] == "session_id"
    assert client.get("/v1/sessions/bad%20id!").status_code == 400 and deps.backend.requests == []


# --- keys, sessions, the small endpoints ---------------------------------------------------------
def test_keys_come_first_and_sessions_belong_to_their_key():
    client, deps = make(keys=[KEY_A, KEY_B])
    a, b = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
    for r in (chat(client, [user("x")]), client.post("/v1/chat/completions", content=b"{not json"),
              client.post("/v1/responses", content=b"x" * 10_000), client.get("/v1/models"),
              chat(client, [user("x")], headers={"Authorization": "Bearer wrong"})):
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"  # before the body
    assert chat(client, [user("x")], sid="s", headers=a).status_code == 200
    # each key has its own session ids: B's "s" is another session, and B cannot tell A has one
    assert client.get("/v1/sessions/s", headers=b).status_code == 404
    assert client.delete("/v1/sessions/s", headers=b).status_code == 404
    r = chat(client, [user("y"), user("z")], sid="s", headers=b)
    assert r.status_code == 200 and r.headers["x-session-id"] == "s"
    assert client.get("/v1/sessions/s", headers=b).json()["id"] == "s"
    assert client.get("/v1/sessions/s", headers=a).json()["turns"] == 1  # untouched by B's turn
    assert client.delete("/v1/sessions/s", headers=b).status_code == 200
    assert client.get("/v1/sessions/s", headers=a).json()["turns"] == 1  # nor by B's delete
    sid_a = scoped_session(owner_of(a["Authorization"], {KEY_A}), "s")
    assert sid_a != "s" and sid_a.endswith("-s")  # what the workers hold: the id under A's key
    rid = client.post("/v1/responses", json={"model": MODEL, "input": "x"}, headers=a).json()["id"]
    assert client.get(f"/v1/responses/{rid}", headers=b).status_code == 404
    r = client.post("/v1/responses", json={"model": MODEL, "input": "y", "previous_response_id": rid}, headers=b)
    assert r.status_code == 404 and client.get(f"/v1/responses/{rid}", headers=a).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes need no key


def test_session_info_and_delete(app):
    client, deps = app
    chat(client, [user("hello")], sid="s")
    info = client.get("/v1/sessions/s").json()
    assert info["id"] == "s" and info["turns"] == 1
    assert client.delete("/v1/sessions/s").json() == {"id": "s", "object": "session.deleted", "deleted": True}
    assert client.get("/v1/sessions/s").status_code == 404 and client.delete("/v1/sessions/s").status_code == 404


def test_models_probes_metrics_and_request_ids(app):
    client, deps = app
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL]
    assert client.get("/healthz").json()["status"] == "ok" and client.get("/readyz").status_code == 200
    deps.health = StaticHealth(workers=0)
    client2 = TestClient(build_router_app(ServeConfig(), deps))
    assert client2.get("/readyz").status_code == 503
    chat(client, [user("x")])
    assert client.get("/metrics").text == "lessserve_requests_total 1\n"
    r = client.get("/healthz", headers={"x-request-id": "req-given"})
    assert r.headers["x-request-id"] == "req-given" and client.get("/nope").headers["x-request-id"].startswith("req-")


def test_the_document_comes_from_the_request_models(app):
    client, _ = app
    doc = client.get("/openapi.json").json()
    chat_op, resp_op = doc["paths"]["/v1/chat/completions"]["post"], doc["paths"]["/v1/responses"]["post"]
    assert chat_op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    assert resp_op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ResponsesRequest"}
    schemas = doc["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["enum"] == [MODEL]
    assert {"ChatMessage", "TextPart", "InputMessage", "ErrorResponse"} <= set(schemas)
    assert [p["name"] for p in chat_op["parameters"]] == ["X-Session-Id"]
    assert set(chat_op["responses"]) == {"200", "400", "401", "403", "404", "413", "429", "503"}  # quotas: 403, 429
    assert all("422" not in op["responses"] for path in doc["paths"].values() for op in path.values())
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_completions_echo_prompt_logprobs_and_choices_per_prompt(app):
    """The legacy API as lm-evaluation-harness calls it: token-id prompts in a batch, echo,
    logprobs, one generated token; choice i * n + j is prompt i's choice j."""
    client, deps = app
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [[5, 6, 7], [8, 9]], "max_tokens": 1,
                                             "logprobs": 1, "echo": True, "temperature": 0, "n": 2, "seed": 1234})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3] and body["object"] == "text_completion"
    first = body["choices"][0]["logprobs"]
    assert first["token_logprobs"][0] is None and first["top_logprobs"][0] is None
    assert len(first["token_logprobs"]) == 3 + 1 and all(v == -1.0 for v in first["token_logprobs"][1:])
    assert first["tokens"][:3] == ["5", "6", "7"] and len(first["top_logprobs"][1]) == 1
    assert body["choices"][2]["text"].startswith("8 9")  # echoed
    reqs = deps.backend.requests
    assert [q.prompt for q in reqs] == [[5, 6, 7], [8, 9]] and all(q.prompt_logprobs == 1 and q.n == 2 for q in reqs)


@pytest.mark.parametrize("over,field", [
    ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"), ({"prompt": []}, "prompt"),
    ({"prompt": ["a", "b"], "stream": True}, "stream"), ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": -1}, "max_tokens"), ({"echo": "yes"}, "echo"), ({"guided_json": {}}, "guided_json"),
])
def test_a_bad_completions_field_is_400_naming_it(app, over, field):
    client, deps = app
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", **over})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), r.text
    assert deps.backend.requests == []


def test_chat_n_and_logprobs_reach_the_worker_and_come_back_per_choice(app):
    client, deps = app
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [user("hi there")], "n": 2,
                                                  "logprobs": True, "top_logprobs": 2})
    body = r.json()
    assert r.status_code == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    content = body["choices"][1]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["echo ", "hi ", "there "] and len(content[0]["top_logprobs"]) == 2
    assert deps.backend.requests[-1].n == 2 and deps.backend.requests[-1].logprobs == 2
    with client.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": [user("a b")], "n": 2,
                                                            "stream": True, "logprobs": True}) as s:
        frames = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    ends = [f["choices"][0]["index"] for f in frames if f["choices"] and f["choices"][0]["finish_reason"]]
    assert sorted(ends) == [0, 1]
    assert all(f["choices"][0]["logprobs"] for f in frames if f["choices"] and f["choices"][0]["delta"].get("content"))


def test_responses_forced_function_call_round_trip(app):
    """A forced call comes back as a function_call output item; its output, sent back as input
    (with the call, as the Agents SDK does), renders as the call's text and a tool message."""
    client, deps = app
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}, "strict": True}
    r = create(client, input="find it", tools=[tool], tool_choice="required", include=[], truncation="auto")
    assert r.status_code == 200, r.text
    assert deps.backend.requests[-1].grammar is not None
    out = r.json()["output"][0]
    # the fake echoes words, not JSON: the call did not complete, so the text comes back as a message
    assert out["type"] == "message" and r.json()["tools"][0]["name"] == "lookup"
    items = [{"role": "user", "content": "find it"},
             {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{\"q\": 1}",
              "id": "fc_1", "status": "completed"},
             {"type": "function_call_output", "call_id": "call_1", "output": "found"}]
    r = create(client, input=items, tools=[tool], tool_choice="none")
    assert r.status_code == 200, r.text
    assert deps.backend.requests[-1].messages[-2:] == [
        {"role": "assistant", "content": '{"name":"lookup","arguments":{"q":1}}'}, {"role": "tool", "content": "found"}]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto",
                              "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("/v1/responses", {"input": "x", "tools": [{"type": "function", "name": "f"}]}),
])
def test_tool_choice_auto_reaches_the_worker_which_refuses_it_without_a_tool_template(app, path, body):
    """"auto" (also OpenAI's default with tools) is the worker's call: it knows the chat template.
    A template that renders no tools (the fake's, the default model's) is a 400 naming tool_choice."""
    client, deps = app
    r = client.post(path, json={"model": MODEL, **body})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("tool_choice"), r.text
    req = deps.backend.requests[-1]
    assert req.auto_tools and req.tools[0]["function"]["name"] == "f"
