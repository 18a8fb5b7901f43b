"""Typed errors of the session cache store. Callers catch these, never a bare None.

Each is a branch of the one tree (lessserve.errors): a backend that is down is also a
DependencyUnavailableError, a full tier a CapacityError, so boundaries map them by category.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lessserve.errors.tree import CapacityError, DependencyUnavailableError, LessServeError, NotFoundError


class CacheStoreError(LessServeError):
    """Base class for every error the cache store raises on purpose."""


class CacheMissError(CacheStoreError, NotFoundError):
    """The session has no copy in the tier (or in any tier) that was asked."""


class TierUnavailableError(CacheStoreError, DependencyUnavailableError):
    """A tier's backend (e.g. the Redis server) could not be reached or failed mid-operation."""


@contextlib.contextmanager
def unavailable_as(cls: type[DependencyUnavailableError]) -> Iterator[None]:
    """Re-raise a TierUnavailableError as `cls` (a view's own error over the shared KV), chained."""
    try:
        yield
    except TierUnavailableError as e:
        raise cls(str(e)) from e


class TierFullError(CacheStoreError, CapacityError):
    """A value does not fit in a tier even after evicting every unpinned session."""


class SessionPinnedError(CacheStoreError, CapacityError):
    """The session is in use by a running request and cannot be moved or deleted now."""


class CodecError(CacheStoreError):
    """An encoded session cache cannot be decoded (base of the codec's typed errors)."""


class BadMagicError(CodecError):
    """The bytes are not an encoded session cache (wrong magic)."""


class FormatVersionError(CodecError):
    """The cache was written in a format version this code does not read."""


class TruncatedError(CodecError):
    """The encoded cache is shorter (or longer) than its header says."""


class ChecksumError(CodecError):
    """The header or payload checksum does not match: the bytes were corrupted."""


class IncompatibleCacheError(CodecError):
    """The cache was written under another model / policy / budget / LESS weights / layout."""


class RestoreError(CacheStoreError):
    """A session could not be restored to the device from `tier`; the cause is chained (`__cause__`).

    The worker answers it by re-prefilling the session's transcript (a recompute)."""

    def __init__(self, sid: str, tier: str, cause: Exception):
        super().__init__(f"session {sid!r}: restore from {tier} failed: {type(cause).__name__}: {cause}")
        self.sid, self.tier, self.cause = sid, tier, cause

    def __reduce__(self):  # picklable across Ray: rebuilt from its three arguments
        return type(self), (self.sid, self.tier, self.cause)
