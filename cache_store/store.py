"""TieredCacheStore: where each session's cache lives (device, host, Redis) and moving it.

Device -> host when slots run short (make_room) or a session idles; host -> Redis under host
pressure, after an idle time, or on drain; Redis / host -> device on restore. The device tier is
abstract (the worker implements it over its engine). Sessions in use are pinned: never evicted,
moved or deleted under a running request. Movement is serialised by one asyncio lock; tiers
themselves take concurrent callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lessserve.cache_store.codec import read_header
from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.errors import (
    CacheMissError,
    CacheStoreError,
    CodecError,
    RestoreError,
    SessionPinnedError,
    TierFullError,
    TierUnavailableError,
)
from lessserve.cache_store.host_tier import HostTier
from lessserve.cache_store.kv import KV, MemoryKV
from lessserve.cache_store.lru import LRU
from lessserve.cache_store.redis_kv import RedisKV
from lessserve.cache_store.shared_tier import SharedTier
from lessserve.cache_store.tier import TIER_ORDER, DeviceTier, Tier, TierStats
from lessserve.cache_store.transcripts import Transcripts


@dataclass(frozen=True)
class Restored:
    source: str  # tier the cache came from ("device" when it never left)
    meta: dict  # the encoded cache's header meta ({} when it never left the device)


class TieredCacheStore:
    """`kv` is the shared state every worker reaches (the cluster passes Redis or its state actor,
    cluster/shared_state.py); without one, a RedisKV when config.redis_url is set, else none: no
    shared tier, and transcripts in this process. The shared tier and the transcripts are views
    over it. Tiers are reported under their own names: "device", "host", and the shared tier's
    (the KV's) name ("redis", "cluster")."""

    def __init__(self, config: StoreConfig, device: DeviceTier, host: HostTier | None = None,
                 kv: KV | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.device = device
        self.host = host or HostTier(config.host_bytes)
        if kv is None and config.redis_url:  # standalone (CLI, benchmarks, tests): Redis or nothing
            kv = RedisKV.from_config(config)
        self.shared = SharedTier(kv, config.redis_prefix, config.ttl_s, config.part_bytes) if kv else None
        self.shared_name = self.shared.name if self.shared else None
        self.transcripts = Transcripts(kv or MemoryKV(), config.redis_prefix, config.transcript_ttl_s)
        self.tiers: dict[str, Tier] = {"device": device, "host": self.host}
        if self.shared:
            self.tiers[self.shared.name] = self.shared
        self.lru = {"device": LRU(clock), "host": LRU(clock)}
        self.counters = {name: TierStats() for name in self.tiers}
        self.recomputes_total = 0
        self.dropped_total = 0  # device caches dropped because no tier could take them
        self._loc: dict[str, str] = {}  # this store's own sessions on device / host (Redis is asked)
        self._pins: dict[str, int] = {}
        self._lock = asyncio.Lock()

    # --- pinning ----------------------------------------------------------------------------
    def pin(self, sid: str) -> None:
        self._pins[sid] = self._pins.get(sid, 0) + 1

    def unpin(self, sid: str) -> None:
        n = self._pins.get(sid, 0) - 1
        if n > 0:
            self._pins[sid] = n
        else:
            self._pins.pop(sid, None)

    def is_pinned(self, sid: str) -> bool:
        return sid in self._pins

    @contextlib.asynccontextmanager
    async def pinned(self, sid: str) -> AsyncIterator[None]:
        self.pin(sid)
        try:
            yield
        finally:
            self.unpin(sid)

    def touch(self, sid: str) -> None:
        """Mark a use (the LRU clock of the tier the session is in)."""
        tier = self._loc.get(sid)
        if tier in self.lru:
            self.lru[tier].touch(sid)

    # --- where ------------------------------------------------------------------------------
    def holds(self, sid: str) -> bool:
        """The session's cache is on this store's device or host tier."""
        return sid in self._loc

    async def where(self, sid: str) -> str:
        """The nearest tier holding the session's cache; CacheMissError if none does."""
        if sid in self._loc:
            return self._loc[sid]
        if self.shared and await self.shared.contains(sid):
            return self.shared_name
        raise CacheMissError(f"session {sid!r} has no cache in any tier")

    def _rank(self, tier: str) -> int:
        """Distance from the model: device 0, host 1, the shared tier 2."""
        return TIER_ORDER.index("shared" if tier == self.shared_name else tier)

    def _set_loc(self, sid: str, tier: str | None) -> None:
        old = self._loc.pop(sid, None)
        if old in self.lru:
            self.lru[old].forget(sid)
        if tier in self.lru:
            self._loc[sid] = tier
            self.lru[tier].touch(sid)

    # --- the device -------------------------------------------------------------------------
    def admit(self, sid: str) -> None:
        """The worker placed a (new or rebuilt) session in a device slot itself."""
        self._set_loc(sid, "device")

    async def make_room(self, slots: int = 1) -> None:
        """Free device slots by moving least recently used unpinned sessions to host memory (or on
        to the shared tier). TierFullError only when every device session is pinned."""
        async with self._lock:
            await self._free_device_slots(slots)

    async def _free_device_slots(self, slots: int) -> None:
        while self.device.free_slots < slots:
            victims = self.lru["device"].victims(self._pins)
            if not victims:
                raise TierFullError(f"no free device slot and all {len(self.lru['device'])} sessions are pinned")
            await self._evict_from_device(victims[0])

    async def _evict_from_device(self, sid: str) -> None:
        """Move an unpinned session off the device; when no tier can take it (host full and the
        shared tier full or down), drop its cache: its transcript, or the next request's own
        history, rebuilds it. Counted as `dropped`."""
        try:
            await self._move(sid, "device", "host")
        except (TierFullError, TierUnavailableError):
            await self.device.delete(sid)
            self._set_loc(sid, None)
            self.dropped_total += 1

    # --- moving down ------------------------------------------------------------------------
    async def offload(self, sid: str, to: str) -> str:
        """Move the session's cache down to tier `to`: "host", or "shared" (also spelled by the
        shared tier's name, e.g. "redis"). Returns where it landed (the shared tier when it is
        bigger than the whole host tier)."""
        if to == "shared":
            to = self.shared_name or to
        if to != "host" and to != self.shared_name:
            if to in ("shared", "redis") and not self.shared:
                raise TierUnavailableError("no shared tier configured (StoreConfig.redis_url is None)")
            raise CacheStoreError(f"offload goes to host or the shared tier, not {to!r} (use restore)")
        if self.is_pinned(sid):
            raise SessionPinnedError(f"session {sid!r} is in use")
        async with self._lock:
            src = await self.where(sid)
            if self._rank(src) >= self._rank(to):
                return src
            return await self._move(sid, src, to)

    async def _move(self, sid: str, src: str, dst: str) -> str:
        blob = await self.tiers[src].get(sid)
        if dst == "host" and len(blob) > self.host.capacity and self.shared:
            dst = self.shared_name
        if dst == "host":
            await self._host_room(len(blob), sid)
        await self.tiers[dst].put(sid, blob)  # a failure here leaves the source copy in place
        await self.tiers[src].delete(sid)
        self._set_loc(sid, dst)
        return dst

    async def _host_room(self, nbytes: int, sid: str) -> None:
        """Spill least recently used host sessions to the shared tier (or drop them without one:
        their transcripts rebuild them) until `nbytes` fit."""
        while not self.host.fits(nbytes, replacing=sid):
            victims = [v for v in self.lru["host"].victims(self._pins) if v != sid]
            if not victims:
                raise TierFullError(f"host tier: {nbytes} bytes do not fit ({self.host.used} of "
                                    f"{self.host.capacity} used, nothing evictable)")
            if self.shared:
                await self._move(victims[0], "host", self.shared_name)
            else:
                await self.host.delete(victims[0])
                self._set_loc(victims[0], None)

    async def drain(self) -> int:
        """Move every unpinned session off the device and out of host memory, to the shared tier
        (to host memory without one). Best effort, session by session: one that cannot move (the
        shared tier is down or full) stays where it is. Returns the number of sessions moved."""
        to = self.shared_name or "host"
        moved = 0
        async with self._lock:
            for src in ("device", "host"):
                if src != to:
                    for sid in self.lru[src].victims(self._pins):
                        moved += await self._try_move(sid, src, to)
        return moved

    async def maintain(self) -> int:
        """Idle-time movement (device -> host, host -> shared), best effort. Returns sessions moved."""
        moved = 0
        async with self._lock:
            if self.config.device_idle_s is not None:
                for sid in self.lru["device"].idle(self.config.device_idle_s, self._pins):
                    moved += await self._try_move(sid, "device", "host")
            if self.shared and self.config.host_idle_s is not None:
                for sid in self.lru["host"].idle(self.config.host_idle_s, self._pins):
                    moved += await self._try_move(sid, "host", self.shared_name)
        return moved

    async def _try_move(self, sid: str, src: str, dst: str) -> int:
        """1 if the session moved; 0 if the destination could not take it (it stays in `src`)."""
        try:
            await self._move(sid, src, dst)
            return 1
        except (TierFullError, TierUnavailableError):
            return 0

    # --- moving up --------------------------------------------------------------------------
    async def restore(self, sid: str) -> Restored:
        """Bring the session's cache to the device. Any failure raises RestoreError naming the
        tier (cause chained: CacheMissError, TierUnavailableError, a CodecError, TierFullError);
        a copy that failed to decode is deleted so it is never tried again. A host copy moves up;
        a shared copy stays behind as a fallback unless `keep_redis_copy` is off."""
        async with self._lock:
            if self._loc.get(sid) == "device":
                self.counters["device"].hits += 1
                self.lru["device"].touch(sid)
                return Restored("device", {})
            self.counters["device"].misses += 1
            src = self._loc.get(sid)
            if src is None:  # not here: ask the shared tier (or fail on the host tier without one)
                if self.shared:
                    self.counters["host"].misses += 1
                src = self.shared_name or "host"
            try:
                tier = self.tiers[src]
                blob = await tier.get(sid)
                await self._free_device_slots(1)
                meta = read_header(blob).meta
                await self.device.put(sid, blob)
            except (CacheMissError, TierUnavailableError, CodecError, TierFullError) as e:
                self._failed(sid, src, e)
                if isinstance(e, CodecError):
                    with contextlib.suppress(CacheStoreError):
                        await self.tiers[src].delete(sid)
                    self._set_loc(sid, None)
                raise RestoreError(sid, src, e) from e
            c = self.counters[src]
            c.hits += 1
            c.restores += 1
            if src == "host" or not self.config.keep_redis_copy:
                with contextlib.suppress(TierUnavailableError):
                    await tier.delete(sid)  # a stale copy left by a failure here expires with the TTL
            self._set_loc(sid, "device")
            return Restored(src, meta)

    def _failed(self, sid: str, tier: str, e: Exception) -> None:
        if isinstance(e, CacheMissError):
            self.counters[tier].misses += 1

    def record_recompute(self, tier: str) -> None:
        """The worker rebuilt a session from its transcript after a failed restore from `tier`."""
        self.counters[tier].recomputes += 1
        self.recomputes_total += 1

    # --- delete / transcripts ---------------------------------------------------------------
    async def delete(self, sid: str) -> None:
        """Free the session in every tier, transcript included."""
        if self.is_pinned(sid):
            raise SessionPinnedError(f"session {sid!r} is in use")
        async with self._lock:
            for tier in self.tiers.values():
                await tier.delete(sid)
            await self.transcripts.delete(sid)
            self._set_loc(sid, None)

    async def forget_cache(self, sid: str) -> None:
        """Drop the session's cache in every tier, device included, but keep its transcript (the
        next turn rebuilds it: tests and benchmarks of the recompute path use this)."""
        if self.is_pinned(sid):
            raise SessionPinnedError(f"session {sid!r} is in use")
        async with self._lock:
            for name, tier in self.tiers.items():
                try:
                    await tier.delete(sid)
                except TierUnavailableError:  # a stale shared copy is harmless: it carries its own transcript
                    if name == "device":
                        raise
            self._set_loc(sid, None)

    async def drop_local(self, sid: str) -> None:
        """Drop the session's device and host copies only (the shared tier and transcript stay)."""
        if self.is_pinned(sid):
            raise SessionPinnedError(f"session {sid!r} is in use")
        async with self._lock:
            for name in ("device", "host"):
                await self.tiers[name].delete(sid)
            self._set_loc(sid, None)

    async def put_transcript(self, sid: str, transcript: dict) -> None:
        await self.transcripts.put(sid, transcript)

    async def get_transcript(self, sid: str) -> dict:
        return await self.transcripts.get(sid)

    # --- stats ------------------------------------------------------------------------------
    async def stats(self) -> dict[str, dict]:
        """Per tier: sessions and bytes held now, hits, misses, restores, recomputes. A tier whose
        backend is down reports sessions and bytes as None and its error under "error"."""
        out = {}
        for name, tier in self.tiers.items():
            c = self.counters[name]
            try:
                held = await tier.stats()
                out[name] = TierStats(held.sessions, held.bytes, c.hits, c.misses, c.restores,
                                      c.recomputes).to_dict()
            except TierUnavailableError as e:
                out[name] = {**c.to_dict(), "sessions": None, "bytes": None, "error": str(e)}
        out["total"] = {"recomputes": self.recomputes_total, "dropped": self.dropped_total}
        return out

    async def close(self) -> None:
        for tier in self.tiers.values():
            await tier.close()
