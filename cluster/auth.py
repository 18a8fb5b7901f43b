"""API keys: `Authorization: Bearer <key>`. A session belongs to the key that created it; the
owner recorded is a hash of the key, never the key itself."""

from __future__ import annotations

import hashlib
import hmac

from lessserve.errors.tree import AuthError

ANONYMOUS = "anonymous"


def owner_of(authorization: str | None, keys: set[str]) -> str:
    """The owner id for a request, or AuthError when keys are configured and this one is not valid."""
    if not keys:
        return ANONYMOUS
    if not authorization or not authorization.lower().startswith("bearer "):
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    key = authorization[7:].strip()
    if not any(hmac.compare_digest(key, k) for k in keys):
        raise AuthError("invalid API key")
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]
