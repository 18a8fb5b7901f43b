"""Headers as a hostile client sends them, over the router's HTTP edge (no Ray, no model; the fake
backend): any bytes in Authorization and X-Session-Id, on every route, never a server error. The
schemathesis run (test_openapi_fuzz.py) draws headers from the OpenAPI document; this draws them
from every byte."""

from __future__ import annotations

import asyncio

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lessserve.cluster.config import ServeConfig
from lessserve.cluster.router import build_router_app
from lessserve.testing.fake_backend import fake_deps

KEY = "key-fuzz-0123"
MODEL = "smollm2-135m-instruct"
APP = build_router_app(ServeConfig(api_keys=[KEY]), fake_deps())
ROUTES = [("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 2}),
          ("POST", "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 2}),
          ("GET", "/v1/sessions/s", None), ("DELETE", "/v1/sessions/s", None), ("GET", "/v1/models", None),
          ("GET", "/healthz", None)]
header_bytes = st.binary(max_size=300).filter(lambda b: b"\r" not in b and b"\n" not in b and b"\0" not in b)
auth = st.one_of(header_bytes, header_bytes.map(lambda b: b"Bearer " + b), st.just(f"Bearer {KEY}".encode()),
                 st.text(max_size=40).map(lambda t: ("Bearer " + t).encode("utf-8")))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), authorization=st.none() | auth, session=st.none() | header_bytes)
def test_any_header_bytes_get_a_clear_answer_never_a_server_error(route, authorization, session):
    method, path, json_body = route
    headers = [(b"content-type", b"application/json")]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    if session is not None:
        headers.append((b"x-session-id", session))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://t") as c:
            return await c.request(method, path, headers=headers, json=json_body)

    r = asyncio.run(main())
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400 and path != "/healthz":
        assert r.json()["error"]["message"]  # an OpenAI-style body that says why
    if authorization != f"Bearer {KEY}".encode() and path.startswith("/v1/"):
        assert r.status_code == 401
