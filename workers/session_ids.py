"""Session-id namespaces: the one definition, read by the router (cluster/protocol.py re-exports
it), the worker and its SessionStore.

  client    what a client names (X-Session-Id, `session_id`): SESSION_ID_PATTERN. Durable. Without
            API keys (open mode) the id is used as it is.
  keyed     "~k-<owner>-<client id>": a client id under an API key (`scoped_session`). Each key has
            its own ids: the same id under two keys is two sessions, and no key learns whether
            another uses an id. Durable.
  response  "~r-<24 hex>": the session of one Responses API response (cluster/responses_api.py).
            Durable like a client's: its transcript is saved, it is republished and re-placed.
  private   "~w-<kind>-<key>": a worker's own helper sessions (a shared system prompt's state,
            a one-off turn's slot). Never durable, never published, never listed as resident.

Every id outside the client pattern starts with RESERVED, which the pattern excludes: no client can
name a response's or a worker's session.
"""

from __future__ import annotations

import re
from typing import Literal

SESSION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
RESERVED = "~"
RESPONSE_PREFIX = RESERVED + "r-"
PRIVATE_PREFIX = RESERVED + "w-"
KEYED_PREFIX = RESERVED + "k-"
OPEN_OWNER = "anonymous"  # the owner of every request without API keys (cluster/auth.py)

Namespace = Literal["client", "keyed", "response", "private"]
_CLIENT = re.compile(SESSION_ID_PATTERN)


def response_session(response_id: str) -> str:
    """The session of response `resp_<hex>`: its cache is the conversation right after it."""
    return RESPONSE_PREFIX + response_id.removeprefix("resp_")


def scoped_session(owner: str, client_id: str) -> str:
    """The session a client's id names under its key (owner "key-<hash>"); open mode: the id itself."""
    if owner == OPEN_OWNER:
        return client_id
    return f"{KEYED_PREFIX}{owner.removeprefix('key-')}-{client_id}"


def client_id(sid: str) -> str:
    """What the client called a session (`scoped_session`'s inverse)."""
    return sid.removeprefix(KEYED_PREFIX).split("-", 1)[1] if sid.startswith(KEYED_PREFIX) else sid


def private_session(kind: str, key: str) -> str:
    """A worker's own helper session, e.g. private_session("prefix", sha)."""
    return f"{PRIVATE_PREFIX}{kind}-{key}"


def namespace(sid: str) -> Namespace:
    """ValueError for an id in no namespace (e.g. a malformed client id)."""
    if sid.startswith(RESPONSE_PREFIX):
        return "response"
    if sid.startswith(PRIVATE_PREFIX):
        return "private"
    if sid.startswith(KEYED_PREFIX) and "-" in sid[len(KEYED_PREFIX):] and _CLIENT.fullmatch(client_id(sid)):
        return "keyed"
    if _CLIENT.fullmatch(sid):  # fullmatch: "$" alone would accept a trailing newline
        return "client"
    raise ValueError(f"session id {sid!r} is in no namespace")


def is_client_id(sid: str) -> bool:
    return _CLIENT.fullmatch(sid) is not None


def is_durable(sid: str) -> bool:
    """Whether the session's transcript is saved and the session published (every id but a
    worker's private ones)."""
    return not sid.startswith(PRIVATE_PREFIX)
