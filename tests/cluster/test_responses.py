"""The OpenAI Responses API with the official `openai` client against the real cluster (two
workers, Redis, API keys): chains, forks, streaming, store: false, isolation between keys, a
worker killed between turns, and what chat completions now refuse clearly instead of ignoring."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from openai import OpenAI

from tests.cluster.bad_requests import BAD_RESPONSES
from tests.cluster.conftest import KEY_A, KEY_B

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def client_b(cluster):
    return OpenAI(base_url=cluster["url"] + "/v1", api_key=KEY_B, timeout=300, max_retries=0)


def chat_reply(client, messages, max_tokens) -> str:
    """The same conversation through chat completions, on a fresh session: what a chain must equal."""
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)
    return r.choices[0].message.content


def test_a_chain_prefills_only_new_input_and_equals_chat_completions(cluster, client):
    r1 = client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=8)
    assert r1.id.startswith("resp_") and r1.output_text.strip() and r1.usage.input_tokens_details.cached_tokens == 0
    r2 = client.responses.create(model=MODEL, input="Why that one?", previous_response_id=r1.id, max_output_tokens=8)
    r3 = client.responses.create(model=MODEL, input="Name a fruit of that colour.", previous_response_id=r2.id,
                                 max_output_tokens=8)
    cached = [r.usage.input_tokens_details.cached_tokens for r in (r1, r2, r3)]
    assert cached[1] > r1.usage.input_tokens - 2 and cached[2] > r2.usage.input_tokens - 2, cached
    hist = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": r1.output_text},
            {"role": "user", "content": "Why that one?"}, {"role": "assistant", "content": r2.output_text},
            {"role": "user", "content": "Name a fruit of that colour."}]
    assert r3.output_text == chat_reply(client, hist, 8)
    got = client.responses.retrieve(r2.id)
    assert got.output_text == r2.output_text and got.previous_response_id == r1.id
    client.responses.delete(r3.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r3.id)


def test_forks_branch_without_leaking_into_each_other(cluster, client):
    root = client.responses.create(model=MODEL, input="Name an animal.", max_output_tokens=6)
    a = client.responses.create(model=MODEL, input="Where does it live?", previous_response_id=root.id,
                                max_output_tokens=8)
    b = client.responses.create(model=MODEL, input="What does it eat?", previous_response_id=root.id,
                                max_output_tokens=8)
    for br in (a, b):
        assert br.usage.input_tokens_details.cached_tokens >= root.usage.input_tokens  # the shared history: copied
    base = [{"role": "user", "content": "Name an animal."}, {"role": "assistant", "content": root.output_text}]
    assert a.output_text == chat_reply(client, [*base, {"role": "user", "content": "Where does it live?"}], 8)
    assert b.output_text == chat_reply(client, [*base, {"role": "user", "content": "What does it eat?"}], 8)
    a2 = client.responses.create(model=MODEL, input="Is it big?", previous_response_id=a.id, max_output_tokens=6)
    hist = [*base, {"role": "user", "content": "Where does it live?"}, {"role": "assistant", "content": a.output_text},
            {"role": "user", "content": "Is it big?"}]
    assert a2.output_text == chat_reply(client, hist, 6)  # b's question never reached a's branch


def test_streaming_events_and_store_false(cluster, client):
    types, deltas, final = [], [], None
    with client.responses.stream(model=MODEL, input="Say hello.", max_output_tokens=8) as stream:
        for ev in stream:
            types.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
        final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.output_text.delta" in types and "".join(deltas) == final.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text
    gone = client.responses.create(model=MODEL, input="Say hi.", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError, match="store: false"):
        client.responses.create(model=MODEL, input="And?", previous_response_id=gone.id)


def test_responses_belong_to_their_key(cluster, client, client_b):
    r = client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client_b.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client_b.responses.create(model=MODEL, input="Why?", previous_response_id=r.id)
    with pytest.raises(openai.NotFoundError):
        client_b.responses.delete(r.id)
    assert client.responses.retrieve(r.id).id == r.id


def test_a_chain_survives_its_worker_being_killed(cluster, client):
    import ray

    r1 = client.responses.create(model=MODEL, input="Name a city.", max_output_tokens=6)
    named = ray.util.list_named_actors(all_namespaces=True)
    for a in named:  # kill every worker replica: the next turn runs on a fresh one, from the record
        if "LessWorker" in a["name"]:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    end, r2 = time.time() + 240, None
    while r2 is None:
        try:
            r2 = client.responses.create(model=MODEL, input="Is it large?", previous_response_id=r1.id,
                                         max_output_tokens=6)
        except (openai.APIStatusError, openai.APIConnectionError):
            if time.time() > end:
                raise
            time.sleep(2)
    hist = [{"role": "user", "content": "Name a city."}, {"role": "assistant", "content": r1.output_text},
            {"role": "user", "content": "Is it large?"}]
    assert r2.output_text == chat_reply(client, hist, 6)


@pytest.mark.parametrize("body,field", [*BAD_RESPONSES, ({"input": "x", "temperature": "hot"}, "temperature")])
def test_bad_responses_requests_are_400_naming_the_field(cluster, body, field):
    r = httpx.post(cluster["url"] + "/v1/responses", headers={"Authorization": f"Bearer {KEY_A}"},
                   json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("extra,field", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),  # auto: the worker's template
    ({"top_logprobs": 2}, "top_logprobs"), ({"n": 17}, "n"), ({"top_k": 5}, "top_k"),
    ({"frequency_penalty": 0.5}, "frequency_penalty")])
def test_chat_fields_the_server_cannot_honour_are_refused_not_ignored(cluster, extra, field):
    r = httpx.post(cluster["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), r.text


def test_chat_accepts_text_parts_and_developer_role(cluster, client):
    r = client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "a colour."}]}])
    assert r.choices[0].message.content.strip()
