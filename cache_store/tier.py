"""The tier interfaces: device slots and host memory (local, synchronous) and the shared tier.

A tier stores one encoded session cache (see codec.py) per session id. The local tiers (device
slots, host memory) are synchronous: they do no I/O and run on the thread that owns the slot slab.
The shared tier (Redis, or the cluster-state actor) is async: its calls are awaited on the worker's
event loop, never on the slab's thread. Both speak the same verbs (LMCache/SGLang style). A
missing session raises CacheMissError; a backend failure raises TierUnavailableError.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass

from lessserve.cache_store.codec import Blob

TIER_ORDER = ("device", "host", "shared")  # roles, nearest the model first; the shared tier has its own name


@dataclass
class TierStats:
    sessions: int = 0
    bytes: int = 0
    hits: int = 0  # a restore found the session here
    misses: int = 0  # a restore looked here and did not find it
    restores: int = 0  # the session was restored to the device from here
    recomputes: int = 0  # the copy here was lost / corrupt / incompatible and the session was re-prefilled

    def to_dict(self) -> dict:
        return asdict(self)


class Tier(abc.ABC):
    """The shared tier every worker reaches (Redis, the cluster-state actor): async I/O."""

    name: str

    @abc.abstractmethod
    async def contains(self, sid: str) -> bool: ...

    @abc.abstractmethod
    async def get(self, sid: str) -> Blob:
        """The session's encoded cache; CacheMissError if absent."""

    @abc.abstractmethod
    async def put(self, sid: str, blob: Blob) -> None:
        """Store (or replace) the session's cache. A failed put leaves the previous copy readable."""

    @abc.abstractmethod
    async def delete(self, sid: str) -> bool:
        """Drop the session's cache; True if there was one."""

    @abc.abstractmethod
    async def keys(self) -> list[str]:
        """Session ids held (for drains and stats)."""

    @abc.abstractmethod
    async def stats(self) -> TierStats:
        """Sessions and bytes held now (hit / miss counters are kept by the store)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections / memory."""


class LocalTier(abc.ABC):
    """A tier in this process's memory (device slots, host buffers): synchronous, no I/O."""

    name: str

    @abc.abstractmethod
    def contains(self, sid: str) -> bool: ...

    @abc.abstractmethod
    def get(self, sid: str) -> Blob:
        """The session's encoded cache; CacheMissError if absent."""

    @abc.abstractmethod
    def put(self, sid: str, blob: Blob) -> None:
        """Store (or replace) the session's cache. A failed put leaves the previous copy readable."""

    @abc.abstractmethod
    def delete(self, sid: str) -> bool:
        """Drop the session's cache; True if there was one."""

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Session ids held."""

    @abc.abstractmethod
    def stats(self) -> TierStats:
        """Sessions and bytes held now (hit / miss counters are kept by the store)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release memory."""


class DeviceTier(LocalTier):
    """The device level: a fixed number of session slots owned by the worker's engine.

    `put` loads a cache into a slot (allocating one), `get` exports it, `delete` frees the slot.
    Implemented on the worker side (lessserve.workers.device_tier) over the engine's slab.
    """

    name = "device"

    @property
    @abc.abstractmethod
    def free_slots(self) -> int: ...

    @abc.abstractmethod
    def slot_bytes(self) -> int:
        """Device bytes one session occupies."""
