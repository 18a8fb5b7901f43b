"""The serving cluster end to end: OpenAI client, affinity, scaling, worker death, auth, bad input."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from tests.cluster.conftest import KEY_A, KEY_B, deploy

MODEL = "smollm2-135m-instruct"
H = {"Authorization": f"Bearer {KEY_A}"}


def sid() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def info(cluster, s, key=KEY_A) -> httpx.Response:
    return httpx.get(f"{cluster['url']}/v1/sessions/{s}", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def turn(client, s, messages, stream=False, max_tokens=12):
    hdr = {"X-Session-Id": s}
    if stream:
        parts, use = [], None
        for ch in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True}, extra_headers=hdr):
            if ch.choices and ch.choices[0].delta.content:
                parts.append(ch.choices[0].delta.content)
            if ch.usage:
                use = ch.usage
        return "".join(parts), use
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, extra_headers=hdr)
    return r.choices[0].message.content, r.usage


QUESTIONS = ["Name a large animal.", "Where does it live?", "What does it eat?"]


def converse(client, s, stream=False, questions=QUESTIONS):
    msgs, out = [], []
    for q in questions:
        msgs.append({"role": "user", "content": q})
        text, use = turn(client, s, msgs, stream=stream)
        out.append((text, use))
        msgs.append({"role": "assistant", "content": text})
    return msgs, out


@pytest.mark.parametrize("stream", [False, True])
def test_three_turns_prefill_only_new_tokens(cluster, client, stream):
    s = sid()
    _, out = converse(client, s, stream=stream)
    assert all(text.strip() for text, _ in out)
    first, later = out[0][1], [u for _, u in out[1:]]
    assert first.prompt_tokens_details.cached_tokens == 0
    for u in later:  # the history was not prefilled again
        assert u.prompt_tokens_details.cached_tokens > first.prompt_tokens
        assert u.prompt_tokens - u.prompt_tokens_details.cached_tokens < 30
    st = info(cluster, s).json()
    assert st["turns"] == 3 and st["tier"] == "device" and 0 < st["cached_tokens"] <= 48
    assert st["tokens_seen"] >= later[-1].prompt_tokens and st["cache_bytes"] > 0
    metrics = httpx.get(cluster["url"] + "/metrics", timeout=30).text
    assert "lessserve_ttft_seconds_bucket" in metrics and "lessserve_tokens_prefilled_total" in metrics


def test_sessions_stick_to_one_worker(cluster, client):
    seen = {}
    sessions = [sid() for _ in range(10)]  # all on one of 2 workers by chance: 2/1024
    for s in sessions:
        msgs = [{"role": "user", "content": "Say hello."}]
        for _ in range(2):
            text, _ = turn(client, s, msgs, max_tokens=4)
            msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "Again."}]
            seen.setdefault(s, set()).add(info(cluster, s).json()["worker"])
    assert all(len(w) == 1 for w in seen.values()), seen
    assert len(set().union(*seen.values())) == 2  # both workers serve sessions


def test_auth_and_isolation(cluster):
    url = cluster["url"] + "/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    r = httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    s = sid()
    assert httpx.post(url, json=body, headers={**H, "X-Session-Id": s}, timeout=120).status_code == 200
    # session ids belong to their key: B can neither see, squat nor delete A's "s"; its own "s" is another
    assert info(cluster, s, KEY_B).status_code == 404
    b = {"Authorization": f"Bearer {KEY_B}"}
    assert httpx.delete(f"{cluster['url']}/v1/sessions/{s}", headers=b, timeout=60).status_code == 404
    r = httpx.post(url, json=body, headers={**b, "X-Session-Id": s}, timeout=120)
    assert r.status_code == 200 and r.headers["x-session-id"] == s
    assert info(cluster, s, KEY_B).json()["turns"] == 1 and info(cluster, s).json()["turns"] == 1
    assert httpx.delete(f"{cluster['url']}/v1/sessions/{s}", headers=b, timeout=60).status_code == 200
    assert info(cluster, s).status_code == 200 and info(cluster, s, KEY_B).status_code == 404  # A's untouched


BAD = [
    (b"{not json", 400),
    (json.dumps({"model": "gpt-unknown", "messages": [{"role": "user", "content": "x"}]}), 404),
    (json.dumps({"model": MODEL}), 400),
    (json.dumps({"model": MODEL, "messages": "hello"}), 400),
    (json.dumps({"model": MODEL, "messages": []}), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 300_000}]}), 413),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "session_id": "bad id!"}), 400),
    (json.dumps([1, 2]), 400),
]


def test_bad_input_is_4xx_and_session_survives(cluster, client):
    s = sid()
    msgs = [{"role": "user", "content": "Name a colour."}]
    text, _ = turn(client, s, msgs, max_tokens=6)
    before = info(cluster, s).json()
    for body, status in BAD:
        r = httpx.post(cluster["url"] + "/v1/chat/completions", content=body,
                       headers={**H, "X-Session-Id": s, "Content-Type": "application/json"}, timeout=60)
        assert r.status_code == status, (body[:80], r.status_code, r.text[:200])
        assert r.json()["error"]["message"]
    r = httpx.get(cluster["url"] + "/v1/sessions/bad%20id!", headers=H, timeout=30)
    assert r.status_code == 400
    assert info(cluster, s).json() == before  # no bad request touched the session
    text2, use = turn(client, s, [*msgs, {"role": "assistant", "content": text},
                                  {"role": "user", "content": "Another?"}], max_tokens=6)
    assert text2.strip() and use.prompt_tokens_details.cached_tokens > 0


def test_models_health_openapi_delete(cluster, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(cluster["url"] + "/healthz", timeout=30).json()["status"] == "ok"
    spec = httpx.get(cluster["url"] + "/openapi.json", timeout=30).json()
    assert "/v1/chat/completions" in spec["paths"]
    s = sid()
    turn(client, s, [{"role": "user", "content": "hi"}], max_tokens=3)
    assert httpx.delete(f"{cluster['url']}/v1/sessions/{s}", headers=H, timeout=60).status_code == 200
    assert info(cluster, s).status_code == 404


def _expected_answers(questions, max_tokens=12):
    """What the same config answers when the session never moves (in process, same engine)."""
    from lessserve.workers.config import EngineConfig
    from lessserve.workers.engine import Engine
    from lessserve.workers.local_sessions import LocalSessions

    msgs, out = [], []
    with LocalSessions(Engine(EngineConfig(policy="h2o", budget=48, max_slots=1, prefill_chunk=32))) as ss:
        for q in questions:
            msgs.append({"role": "user", "content": q})
            text = "".join(ss.turn("s", msgs, max_new_tokens=max_tokens))
            out.append(text)
            msgs.append({"role": "assistant", "content": text})
    return out


def test_scale_up_and_down_keeps_every_conversation(cluster, client):
    qs = ["Tell me a fact about the moon.", "And one about the sun?", "Which is bigger?"]
    expected = _expected_answers(qs)
    sessions = [sid() for _ in range(4)]
    hist = {s: [] for s in sessions}

    def step(i):
        for s in sessions:
            hist[s].append({"role": "user", "content": qs[i]})
            text, _ = turn(client, s, hist[s])
            assert text == expected[i], (s, i)
            hist[s].append({"role": "assistant", "content": text})

    cfg = dict(cluster["cfg"])
    step(0)
    deploy({**cfg, "workers": {"min_workers": 1, "max_workers": 1}})  # 2 -> 1: one worker drains
    step(1)
    deploy({**cfg, "workers": {"min_workers": 2, "max_workers": 2}})  # 1 -> 2
    step(2)
    workers = {info(cluster, s).json()["worker"] for s in sessions}
    assert workers  # every session is still found after the moves


def test_worker_killed_mid_conversation(cluster, client):
    import ray

    s = sid()
    msgs = [{"role": "user", "content": "Name a fruit."}]
    text, _ = turn(client, s, msgs, max_tokens=6)
    victim = info(cluster, s).json()["worker"]
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"]]
    assert actors, victim
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "Another one?"}]
    deadline = time.time() + 180
    while True:
        try:
            text2, _ = turn(client, s, msgs, max_tokens=6)
            break
        except Exception:  # noqa: BLE001 - the router may still list the dead replica briefly
            if time.time() > deadline:
                raise
            time.sleep(1)
    assert text2.strip()
    st = info(cluster, s).json()
    assert st["worker"] != victim and st["turns"] >= 2


def test_health_answers_at_once_while_eight_streams_are_in_flight(cluster):
    """Serve's default max_ongoing_requests (5) once queued GET /healthz behind 6 chat streams for
    42.9 s; the router replica now takes router_max_ongoing_requests requests at once."""
    import threading

    url, first, results = cluster["url"], threading.Semaphore(0), []

    def stream(i: int) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count slowly from {i} to 80."}],
                "max_tokens": 64, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=H, timeout=300) as r:
            seen = False
            for line in r.iter_lines():
                if line.startswith("data:") and not seen:
                    seen = True
                    first.release()
            results.append(r.status_code)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    streaming = sum(first.acquire(timeout=180) for _ in range(6))  # at least 6 streams are sending tokens
    t0 = time.perf_counter()
    h = httpx.get(url + "/healthz", timeout=30)
    took = time.perf_counter() - t0
    for t in threads:
        t.join(timeout=300)
    assert streaming == 6 and h.status_code == 200, (streaming, h.text)
    assert took < 1.0, f"/healthz took {took:.2f} s behind the streams"
    assert results == [200] * 8
