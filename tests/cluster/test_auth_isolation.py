"""API keys and session isolation, without a cluster: `owner_of` (cluster/auth.py) and the router's
`check_session` (cluster/router.py) on a fake session directory. Fast: these are the mutation run's
tests for both (tests/mutation)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from lessserve.cluster.auth import ANONYMOUS, owner_of
from lessserve.errors.tree import AuthError

KEYS = {"key-one", "key-two"}


def test_no_keys_configured_is_anonymous_whatever_the_header():
    for header in (None, "", "Bearer anything", "Basic x"):
        assert owner_of(header, set()) == ANONYMOUS == "anonymous"


@pytest.mark.parametrize("header", [None, "", "key-one", "Basic key-one", "Bearer", "Bearerkey-one", "Token key-one"])
def test_a_missing_or_malformed_header_is_refused(header):
    with pytest.raises(AuthError, match="missing API key"):
        owner_of(header, KEYS)


@pytest.mark.parametrize("key", ["key-on", "key-one2", "KEY-ONE", "", "key-one key-two", "wrong"])
def test_a_wrong_key_is_refused(key):
    with pytest.raises(AuthError, match="invalid API key"):
        owner_of(f"Bearer {key}", KEYS)


@pytest.mark.parametrize("header", ["Bearer key-one", "bearer key-one", "BEARER key-one", "Bearer  key-one  "])
def test_the_owner_is_a_hash_of_the_key(header):
    want = "key-" + hashlib.sha256(b"key-one").hexdigest()[:16]
    assert owner_of(header, KEYS) == want and "key-one" not in want[4:]
    assert owner_of("Bearer key-two", KEYS) != want


@pytest.mark.parametrize("key", ["clé", "ключ", "\x00\xff\x7f", "😀", "key-one\u00e9", "\udcff"])
def test_a_key_of_any_characters_is_a_401_never_an_error(key):
    """hmac.compare_digest refuses non-ASCII str: such a key was a 500 (TypeError)."""
    with pytest.raises(AuthError, match="invalid API key"):
        owner_of(f"Bearer {key}", KEYS)


def test_a_utf8_key_as_the_wire_delivers_it_matches():
    """ASGI servers decode header bytes as latin-1: a configured UTF-8 key arrives that way."""
    key = "clé-😀"
    wire = key.encode("utf-8").decode("latin-1")
    assert owner_of(f"Bearer {wire}", {key}) == "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    with pytest.raises(AuthError):
        owner_of(f"Bearer {wire[:-1]}", {key})


def test_binary_and_non_ascii_bearer_keys_get_401_over_http():
    """Through the router's HTTP edge (no Ray, no model): raw header bytes, never a 500."""
    import httpx

    from lessserve.cluster.config import ServeConfig
    from lessserve.cluster.router import build_router_app
    from lessserve.testing.fake_backend import fake_deps

    app = build_router_app(ServeConfig(api_keys=sorted(KEYS)), fake_deps())

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            out = []
            for raw in (b"Bearer cl\xc3\xa9", b"Bearer \xff\xfe\x00", b"Bearer \xe2\x82", b"Bearer key-one"):
                r = await c.get("/v1/models", headers=[(b"authorization", raw)])
                out.append(r.status_code)
            return out

    assert asyncio.run(main()) == [401, 401, 401, 200]


# --- the router's per-session check --------------------------------------------------------------
class FakeDirectory:
    def __init__(self, entries: dict, down: bool = False):
        self.entries, self.down, self.asked = entries, down, []

    async def lookup(self, sid: str):
        from lessserve.cluster.directory import DirectoryUnavailableError

        self.asked.append(sid)
        if self.down:
            raise DirectoryUnavailableError("redis down")
        return self.entries.get(sid)


def check(directory: FakeDirectory, sid: str, owner: str):
    """The router's two checks of a client's id: well formed (scoped as in open mode, where the id is
    the session's), then not another owner's."""
    from lessserve.cluster.router import RouterContext, check_session

    return asyncio.run(check_session(directory, RouterContext.scope(sid, "anonymous"), owner))


@pytest.mark.parametrize("sid", ["", "a" * 129, "a b", "x/y", "s\n", "ü", "a;b", "../etc"])
def test_a_malformed_session_id_is_400_before_any_lookup(sid):
    from lessserve.cluster.http_errors import ApiError

    d = FakeDirectory({})
    with pytest.raises(ApiError) as ex:
        check(d, sid, "o")
    assert ex.value.status == 400 and ex.value.param == "session_id" and d.asked == []


@pytest.mark.parametrize("sid", ["a", "a" * 128, "A-z_0.9:x"])
def test_well_formed_ids_are_looked_up(sid):
    d = FakeDirectory({})
    assert check(d, sid, "o") is None and d.asked == [sid]


def test_another_owners_session_is_404_and_yours_or_unowned_is_returned():
    from lessserve.cluster.http_errors import ApiError

    mine, unowned = {"owner": "me", "worker": "w1"}, {"worker": "w2"}
    d = FakeDirectory({"mine": mine, "theirs": {"owner": "them", "worker": "w3"}, "unowned": unowned,
                       "null": {"owner": None}})
    assert check(d, "mine", "me") == mine
    assert check(d, "unowned", "me") == unowned and check(d, "null", "me") == {"owner": None}
    with pytest.raises(ApiError) as ex:
        check(d, "theirs", "me")
    e = ex.value
    assert (e.status, e.type, e.code) == (404, "not_found_error", "session_not_found") and "them" not in str(e)


def test_an_unreachable_directory_defers_the_check_to_the_worker():
    assert check(FakeDirectory({"s": {"owner": "them"}}, down=True), "s", "me") is None
