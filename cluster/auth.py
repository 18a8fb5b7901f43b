"""API keys: `Authorization: Bearer <key>`. A session belongs to the key that created it; the
owner recorded is a hash of the key, never the key itself."""

from __future__ import annotations

import hashlib
import hmac

from lessserve.errors.tree import AuthError
from lessserve.workers.session_ids import OPEN_OWNER as ANONYMOUS


def wire_bytes(value: str) -> bytes:
    """A header value's bytes. ASGI servers decode header bytes as latin-1, which this undoes, so a
    key of any bytes (UTF-8 or not) compares exactly; a str with wider characters (never from the
    wire) is taken as UTF-8."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def owner_of(authorization: str | None, keys: set[str]) -> str:
    """The owner id for a request, or AuthError when keys are configured and this one is not valid.
    Any bytes are a key to compare, in constant time against every configured key (as UTF-8): a
    key that is not ASCII is a 401 like any other wrong key, never an error of the comparison."""
    if not keys:
        return ANONYMOUS
    if not authorization or not authorization.lower().startswith("bearer "):
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    key = wire_bytes(authorization[7:].strip())
    matched = False
    for k in keys:
        matched |= hmac.compare_digest(key, k.encode("utf-8"))
    if not matched:
        raise AuthError("invalid API key")
    return "key-" + hashlib.sha256(key).hexdigest()[:16]
