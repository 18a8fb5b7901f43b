"""Per API key quotas (cluster/quotas.py), through the router's HTTP edge over the fake backend (no
Ray, no model): turns in flight (429 + Retry-After, streams included, freed when a stream ends or
its client goes), sessions and stored responses (403), each per key, none in open mode."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from lessserve.cluster.config import ServeConfig
from lessserve.cluster.quotas import KeyQuotas, QuotaConfig, RateQuotaError
from lessserve.cluster.router import build_router_app
from lessserve.testing.fake_backend import FakeBackend, fake_deps

MODEL = "smollm2-135m-instruct"
A, B = {"Authorization": "Bearer key-aaaa"}, {"Authorization": "Bearer key-bbbb"}


def app(keys=("key-aaaa", "key-bbbb"), **quotas):
    backend = FakeBackend()
    cfg = ServeConfig.model_validate({"api_keys": list(keys), "quotas": {"count_ttl_s": 0.01, **quotas}})
    return build_router_app(cfg, fake_deps(backend)), backend


def run(asgi, body):
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t") as c:
            return await body(c)

    return asyncio.run(main())


def chat(c, headers, sid=None, stream=False, text="hi"):
    return c.post("/v1/chat/completions", headers={**headers, **({"X-Session-Id": sid} if sid else {})},
                  json={"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": stream})


def test_a_guard_counts_turns_until_their_events_end():
    async def main():
        q = KeyQuotas(QuotaConfig(max_concurrent_turns=2), None, None)

        async def events():
            yield 1
            yield 2

        first, second = q.guard("key-x", events()), q.guard("key-x", events())
        with pytest.raises(RateQuotaError, match="2 turns in flight"):
            q.guard("key-x", events())
        assert [e async for e in first] == [1, 2]  # ended: its place is free
        third = q.guard("key-x", events())
        await anext(second)
        await second.aclose()  # closed early (the client went away): freed too
        assert q.in_flight == {"key-x": 1}
        await third.aclose()
        assert q.in_flight == {} and q.guard("anonymous", events()) is not None  # open mode: no limit

    asyncio.run(main())


def test_turns_in_flight_per_key_are_429_with_retry_after_and_free_when_streams_end():
    asgi, backend = app(max_concurrent_turns=1)
    backend.hold = asyncio.Event()

    async def body(c):
        first = asyncio.create_task(chat(c, A, stream=True))
        while not backend.requests:
            await asyncio.sleep(0.001)
        busy = await chat(c, A)
        other = asyncio.create_task(chat(c, B))  # another key is not affected
        await asyncio.sleep(0.05)
        backend.hold.set()
        done = await first
        again = await chat(c, A)
        return busy, await other, done, again

    busy, other, done, again = run(asgi, body)
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    err = busy.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded" and "limit is 1" in err["message"]
    assert other.status_code == 200 and done.status_code == 200 and again.status_code == 200


def test_sessions_per_key_are_capped_with_403_and_existing_ones_go_on():
    asgi, backend = app(max_sessions=2)

    async def body(c):
        out = [(await chat(c, A, sid=s)).status_code for s in ("s1", "s2", "s3")]
        out.append((await chat(c, A, sid="s1", text="more")).status_code)  # an existing session: no new one
        out.append((await chat(c, B, sid="s3")).status_code)  # another key's sessions are its own
        out.append((await chat(c, A)).status_code)  # a one-off turn is no session
        refused = await chat(c, A, sid="s3")
        assert (await c.delete("/v1/sessions/s1", headers=A)).status_code == 200
        await asyncio.sleep(0.02)  # the cached count expires
        out.append((await chat(c, A, sid="s3")).status_code)
        return out, refused

    out, refused = run(asgi, body)
    assert out == [200, 200, 403, 200, 200, 200, 200]
    err = refused.json()["error"]
    assert refused.status_code == 403 and err["code"] == "quota_exceeded" and "2 sessions" in err["message"]
    assert "retry-after" not in refused.headers


def test_stored_responses_per_key_are_capped_and_store_false_still_works():
    asgi, _ = app(max_responses=2)

    async def body(c):
        def create(h, **kw):
            return c.post("/v1/responses", headers=h, json={"model": MODEL, "input": "hello", **kw})

        out = [(await create(A)).status_code for _ in range(3)]
        out.append((await create(A, store=False)).status_code)
        out.append((await create(B)).status_code)
        return out

    assert run(asgi, body) == [200, 200, 403, 200, 200]


def test_stored_bytes_per_key_are_capped():
    asgi, _ = app(max_response_bytes=1024, max_responses=None)

    async def body(c):
        big = "word " * 150  # 750 bytes of input: the second does not fit
        r1 = await c.post("/v1/responses", headers=A, json={"model": MODEL, "input": big})
        r2 = await c.post("/v1/responses", headers=A, json={"model": MODEL, "input": big})
        return r1.status_code, r2

    first, second = run(asgi, body)
    assert first == 200 and second.status_code == 403 and "bytes" in second.json()["error"]["message"]


def test_open_mode_has_no_quotas():
    asgi, _ = app(keys=(), max_sessions=1, max_concurrent_turns=1)

    async def body(c):
        return [(await chat(c, {}, sid=f"s{i}")).status_code for i in range(3)]

    assert run(asgi, body) == [200, 200, 200]


def test_a_router_at_its_turn_limit_answers_503_and_probes_never_wait():
    backend = FakeBackend()
    backend.hold = asyncio.Event()
    cfg = ServeConfig.model_validate({"router_max_turns": 2, "router_max_ongoing_requests": 8})
    asgi = build_router_app(cfg, fake_deps(backend))

    async def body(c):
        running = [asyncio.create_task(chat(c, {}, stream=True)) for _ in range(2)]
        while len(backend.requests) < 2:
            await asyncio.sleep(0.001)
        busy = await chat(c, {})
        health = await c.get("/healthz")
        models = await c.get("/v1/models")
        backend.hold.set()
        done = [r.status_code for r in await asyncio.gather(*running)]
        return busy, health.status_code, models.status_code, done, (await chat(c, {})).status_code

    busy, health, models, done, after = run(asgi, body)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "2" and "2 turns" in busy.text
    assert (health, models, done, after) == (200, 200, [200, 200], 200)


def test_the_turn_limit_leaves_room_for_probes():
    with pytest.raises(ValueError, match="below router_max_ongoing_requests"):
        ServeConfig.model_validate({"router_max_turns": 512, "router_max_ongoing_requests": 512})
