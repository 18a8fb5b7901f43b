"""TieredCacheStore: where each session's cache lives (device, host, the shared tier) and moving it.

Two halves, each with one owner:
  local   the device and host tiers, their LRU clocks, the pins and the locations: synchronous,
          called on the thread that owns the slot slab (the worker's scheduler thread), which the
          async methods below reach through `run_local` (inline when the caller owns the slab).
  shared  the tier every worker reaches (Redis, the cluster-state actor) and the transcripts:
          async, awaited on the caller's event loop with a deadline (`timeout_s`), never on the
          slab's thread.
A move that crosses the halves is split at the boundary: a local call hands out bytes, the shared
tier is written on the event loop, and a second local call releases the local copy only once the
write succeeded and the session was not used in between. Host pressure takes the least recently
used host copies out as spills, which `spill` writes to the shared tier (counted as dropped when it
cannot take them: the transcript rebuilds the session).

Device -> host when slots run short or a session idles; host -> shared under host pressure, after
an idle time, or on drain; shared / host -> device on restore. Sessions in use are pinned: never
evicted, moved or deleted under a running request. Moves that await the shared tier are serialised
by one asyncio lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from lessserve.cache_store.codec import Blob, read_header
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
from lessserve.cache_store.tier import TIER_ORDER, DeviceTier, TierStats
from lessserve.cache_store.transcripts import Transcripts

T = TypeVar("T")
RunLocal = Callable[[Callable[[], Any]], Awaitable[Any]]
LOCAL_TIERS = ("device", "host")


async def run_inline(fn: Callable[[], T]) -> T:
    """`run_local` for a caller that owns the slab itself (tests, benchmarks, the CLI)."""
    return fn()


@dataclasses.dataclass(frozen=True)
class Restored:
    source: str  # tier the cache came from ("device" when it never left)
    meta: dict  # the encoded cache's header meta ({} when it never left the device)


@dataclasses.dataclass(frozen=True)
class Spill:
    """A host copy taken out under host pressure, on its way to the shared tier."""

    sid: str
    blob: bytes


class TieredCacheStore:
    """`kv` is the shared state every worker reaches (the cluster passes Redis or its state actor,
    cluster/shared_state.py); without one, a RedisKV when config.redis_url is set, else none: no
    shared tier, and transcripts in this process. The shared tier and the transcripts are views
    over it. Tiers are reported under their own names: "device", "host", and the shared tier's
    (the KV's) name ("redis", "cluster")."""

    def __init__(self, config: StoreConfig, device: DeviceTier, host: HostTier | None = None,
                 kv: KV | None = None, clock: Callable[[], float] = time.monotonic,
                 run_local: RunLocal = run_inline, timeout_s: float | None = None):
        self.config = config
        self.device = device
        self.host = host or HostTier(config.host_bytes)
        if kv is None and config.redis_url:  # standalone (CLI, benchmarks, tests): Redis or nothing
            kv = RedisKV.from_config(config)
        self.shared = SharedTier(kv, config.redis_prefix, config.ttl_s, config.part_bytes) if kv else None
        self.shared_name = self.shared.name if self.shared else None
        self.transcripts = Transcripts(kv or MemoryKV(), config.redis_prefix, config.transcript_ttl_s)
        self.run_local = run_local
        # a shared tier operation's deadline (several KV calls, each bounded by the client's timeout)
        self.timeout_s = timeout_s if timeout_s is not None else 2 * config.redis_timeout_s + 1.0
        self.local = {"device": device, "host": self.host}
        self.names = [*LOCAL_TIERS, *([self.shared.name] if self.shared else [])]
        # where each of this store's sessions is (device or host; the shared tier is asked) and when it
        # was last used: one LRU per local tier, a session in at most one of them
        self.lru = {"device": LRU(clock), "host": LRU(clock)}
        self.counters = {name: TierStats() for name in self.names}
        self.recomputes_total = 0
        self.shared_misses = 0  # the event loop's own count (fetch); `counters` belong to the slab thread
        self.dropped_total = 0  # caches dropped because no tier could take them
        self._pins: dict[str, int] = {}
        self._spills: list[Spill] = []  # host copies taken out by a local call, for the next `spill`
        self._lock = asyncio.Lock()

    # ===================================================================== the local half (slab thread)
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

    def touch(self, sid: str) -> None:
        """Mark a use (the LRU clock of the tier the session is in)."""
        tier = self.local_tier(sid)
        if tier is not None:
            self.lru[tier].touch(sid)

    # --- where ------------------------------------------------------------------------------
    def holds(self, sid: str) -> bool:
        """The session's cache is on this store's device or host tier."""
        return self.local_tier(sid) is not None

    def local_tier(self, sid: str) -> str | None:
        """"device", "host", or None when neither holds the session."""
        return next((tier for tier, lru in self.lru.items() if sid in lru), None)

    def _rank(self, tier: str) -> int:
        """Distance from the model: device 0, host 1, the shared tier 2."""
        return TIER_ORDER.index("shared" if tier == self.shared_name else tier)

    def _set_loc(self, sid: str, tier: str | None) -> None:
        old = self.local_tier(sid)
        if old is not None:
            self.lru[old].forget(sid)
        if tier in self.lru:
            self.lru[tier].touch(sid)

    # --- the device -------------------------------------------------------------------------
    def admit(self, sid: str) -> None:
        """The worker placed a (new or rebuilt) session in a device slot itself."""
        self._set_loc(sid, "device")

    def free_device_slots(self, slots: int = 1) -> None:
        """Free device slots by moving least recently used unpinned sessions to host memory (host
        pressure takes host copies out as spills). TierFullError only when every device session is
        pinned."""
        while self.device.free_slots < slots:
            victims = self.lru["device"].victims(self._pins)
            if not victims:
                raise TierFullError(f"no free device slot and all {len(self.lru['device'])} sessions are pinned")
            self._evict_from_device(victims[0])

    def _evict_from_device(self, sid: str) -> None:
        """Move an unpinned session off the device; when host memory cannot take it, drop its cache:
        its transcript, or the next request's own history, rebuilds it. Counted as `dropped`."""
        try:
            self._move_local(sid, "device", "host")
        except TierFullError:
            self.device.delete(sid)
            self._set_loc(sid, None)
            self.dropped_total += 1

    def _move_local(self, sid: str, src: str, dst: str, blob: Blob | None = None) -> None:
        blob = self.local[src].get(sid) if blob is None else blob
        self._host_room(len(blob), sid)
        self.local[dst].put(sid, blob)  # a failure here leaves the source copy in place
        self.local[src].delete(sid)
        self._set_loc(sid, dst)

    def _host_room(self, nbytes: int, sid: str) -> None:
        """Take least recently used host copies out (spills for the shared tier, or dropped without
        one: their transcripts rebuild them) until `nbytes` fit."""
        if nbytes > self.host.capacity:
            raise TierFullError(f"host tier: {nbytes} bytes exceed its {self.host.capacity} bytes")
        while not self.host.fits(nbytes, replacing=sid):
            victims = [v for v in self.lru["host"].victims(self._pins) if v != sid]
            if not victims:
                raise TierFullError(f"host tier: {nbytes} bytes do not fit ({self.host.used} of "
                                    f"{self.host.capacity} used, nothing evictable)")
            victim = victims[0]
            if self.shared:
                self._spills.append(Spill(victim, bytes(self.host.get(victim))))
            self.host.delete(victim)
            self._set_loc(victim, None)

    def take_spills(self) -> list[Spill]:
        out, self._spills = self._spills, []
        return out

    # --- restore, locally -------------------------------------------------------------------
    def restore_local(self, sid: str) -> Restored | None:
        """Bring a session held on this store's host tier to the device (a device hit returns at
        once); None when neither local tier holds it. RestoreError (cause chained) when it cannot."""
        if self.local_tier(sid) == "device":
            self.counters["device"].hits += 1
            self.lru["device"].touch(sid)
            return Restored("device", {})
        self.counters["device"].misses += 1
        if self.local_tier(sid) != "host":
            if self.shared:
                self.counters["host"].misses += 1
                return None
            e = CacheMissError(f"session {sid!r} has no cache in any tier")
            self._failed(sid, "host", e)
            raise RestoreError(sid, "host", e) from e
        return self.load(sid, self.host.get(sid), "host")

    def load(self, sid: str, blob, source: str) -> Restored:
        """Decode `blob` (from `source`) into a device slot, making room; a host copy moves up.
        RestoreError on a corrupt or incompatible copy (the local copy is then deleted)."""
        try:
            self.free_device_slots(1)
            meta = read_header(blob).meta
            self.device.put(sid, blob)
        except (CodecError, TierFullError) as e:
            if isinstance(e, CodecError) and source == "host":
                self.host.delete(sid)
                self._set_loc(sid, None)
            raise RestoreError(sid, source, e) from e
        c = self.counters[source]
        c.hits += 1
        c.restores += 1
        if source == "host":
            self.host.delete(sid)
        self._set_loc(sid, "device")
        return Restored(source, meta)

    # --- copies for the shared tier ---------------------------------------------------------
    def export(self, sid: str) -> tuple[str, bytes, float | None]:
        """(tier, encoded copy, its LRU stamp) of a session held locally, which stays where it is."""
        tier = self.local_tier(sid)
        if tier is None:
            raise CacheMissError(f"session {sid!r} is not on this worker")
        return tier, bytes(self.local[tier].get(sid)), self.lru[tier].stamp(sid)

    def release(self, sid: str, tier: str, stamp: float | None) -> bool:
        """Drop the local copy that `export` gave out, now that the shared tier holds it, unless the
        session moved, was pinned or used since. True if it was dropped."""
        if self.local_tier(sid) != tier or self.is_pinned(sid) or self.lru[tier].stamp(sid) != stamp:
            return False
        self.local[tier].delete(sid)
        self._set_loc(sid, None)
        return True

    def drop_local_copies(self, sid: str) -> None:
        """Drop the session's device and host copies (the shared tier's copy and transcript stay)."""
        if self.is_pinned(sid):
            raise SessionPinnedError(f"session {sid!r} is in use")
        for name in LOCAL_TIERS:
            self.local[name].delete(sid)
        self._set_loc(sid, None)

    def record_recompute(self, tier: str) -> None:
        """The worker rebuilt a session from its transcript after a failed restore from `tier`."""
        self.counters[tier].recomputes += 1
        self.recomputes_total += 1

    def _failed(self, sid: str, tier: str, e: Exception) -> None:
        if isinstance(e, CacheMissError):
            self.counters[tier].misses += 1

    def local_stats(self) -> dict[str, dict]:
        out = {}
        for name in LOCAL_TIERS:
            held, c = self.local[name].stats(), self.counters[name]
            out[name] = TierStats(held.sessions, held.bytes, c.hits, c.misses, c.restores, c.recomputes).to_dict()
        return out

    # ===================================================================== the async half (event loop)
    async def local_call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the slab's thread, then write the spills it made to the shared tier."""

        def call():
            try:
                return fn(), None, self.take_spills()
            except BaseException as e:  # noqa: BLE001 - raised again below, after the spills are written
                return None, e, self.take_spills()

        out, err, spills = await self.run_local(call)
        await self.spill(spills)
        if err is not None:
            raise err
        return out

    async def shared_call(self, what: str, aw: Awaitable[T]) -> T:
        """Await one shared-tier call with this store's deadline: past it, the tier counts as down."""
        try:
            return await asyncio.wait_for(aw, self.timeout_s)
        except TimeoutError:
            raise TierUnavailableError(f"{self.shared_name or 'shared'} {what}: no answer in {self.timeout_s:g} s")\
                from None

    async def spill(self, spills: list[Spill]) -> None:
        for s in spills:
            try:
                await self.shared_call("PUT", self.shared.put(s.sid, s.blob))
            except (TierFullError, TierUnavailableError):
                self.dropped_total += 1

    async def where(self, sid: str) -> str:
        """The nearest tier holding the session's cache; CacheMissError if none does."""
        tier = await self.run_local(lambda: self.local_tier(sid))
        if tier is not None:
            return tier
        if self.shared and await self.shared_call("EXISTS", self.shared.contains(sid)):
            return self.shared_name
        raise CacheMissError(f"session {sid!r} has no cache in any tier")

    async def make_room(self, slots: int = 1) -> None:
        """Free device slots (see free_device_slots)."""
        async with self._lock:
            await self.local_call(lambda: self.free_device_slots(slots))

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
        async with self._lock:
            tier, pinned = await self.run_local(lambda: (self.local_tier(sid), self.is_pinned(sid)))
            if pinned:
                raise SessionPinnedError(f"session {sid!r} is in use")
            src = tier or await self.where(sid)
            if self._rank(src) >= self._rank(to):
                return src
            if to == "host":
                try:
                    await self.local_call(lambda: self._move_local(sid, src, "host"))
                    return "host"
                except TierFullError:
                    if not self.shared:
                        raise
            return await self._to_shared(sid)

    async def _to_shared(self, sid: str) -> str:
        """Copy a local session to the shared tier, then drop the local copy."""

        def export():
            if self.is_pinned(sid):
                raise SessionPinnedError(f"session {sid!r} is in use")
            return self.export(sid)

        tier, blob, stamp = await self.local_call(export)
        await self.shared_call("PUT", self.shared.put(sid, blob))  # a failure leaves the local copy in place
        await self.local_call(lambda: self.release(sid, tier, stamp))
        return self.shared_name

    async def drain(self) -> int:
        """Move every unpinned session off the device and out of host memory, to the shared tier
        (to host memory without one). Best effort, session by session: one that cannot move (the
        shared tier is down or full) stays where it is. Returns the number of sessions moved."""
        async with self._lock:
            if not self.shared:
                return await self.local_call(lambda: sum(self._try_local(s, "device") for s in self._victims("device")))
            moved = 0
            for sid in await self.local_call(lambda: [*self._victims("device"), *self._victims("host")]):
                moved += await self._try_shared(sid)
            return moved

    def _victims(self, tier: str) -> list[str]:
        return self.lru[tier].victims(self._pins)

    def _try_local(self, sid: str, src: str) -> int:
        """An idle copy down one tier: to the host, or, when it is bigger than the whole host tier
        (host_bytes 0: host storage off), straight out as a spill for the shared tier."""
        blob = self.local[src].get(sid)
        if self.shared and len(blob) > self.host.capacity:
            self._spills.append(Spill(sid, bytes(blob)))
            self.local[src].delete(sid)
            self._set_loc(sid, None)
            return 1
        try:
            self._move_local(sid, src, "host", blob)
            return 1
        except TierFullError:
            return 0

    async def _try_shared(self, sid: str) -> int:
        try:
            await self._to_shared(sid)
            return 1
        except (TierFullError, TierUnavailableError, SessionPinnedError, CacheMissError):
            return 0

    async def maintain(self) -> int:
        """Idle-time movement (device -> host, host -> shared), best effort. Returns sessions moved."""
        cfg = self.config

        def idle_local() -> tuple[int, list[str]]:
            moved = 0
            if cfg.device_idle_s is not None:
                idle = self.lru["device"].idle(cfg.device_idle_s, self._pins)
                moved = sum(self._try_local(s, "device") for s in idle)
            up = self.lru["host"].idle(cfg.host_idle_s, self._pins) if self.shared and cfg.host_idle_s else []
            return moved, up

        async with self._lock:
            moved, to_shared = await self.local_call(idle_local)
            for sid in to_shared:
                moved += await self._try_shared(sid)
        return moved

    async def restore(self, sid: str) -> Restored:
        """Bring the session's cache to the device. Any failure raises RestoreError naming the
        tier (cause chained: CacheMissError, TierUnavailableError, a CodecError, TierFullError);
        a copy that failed to decode is deleted so it is never tried again. A host copy moves up;
        a shared copy stays behind as a fallback unless `keep_redis_copy` is off."""
        async with self._lock:
            hit = await self.local_call(lambda: self.restore_local(sid))
            if hit is not None:
                return hit
            blob = await self.fetch(sid)
            return await self.restore_fetched(sid, blob)

    async def fetch(self, sid: str):
        """The shared tier's copy of the session; RestoreError (cause chained) when there is none."""
        try:
            return await self.shared_call("GET", self.shared.get(sid))
        except (CacheMissError, TierUnavailableError, CodecError) as e:
            self.shared_misses += isinstance(e, CacheMissError)
            raise RestoreError(sid, self.shared_name, e) from e

    async def restore_fetched(self, sid: str, blob) -> Restored:
        """Load a copy `fetch` returned into a device slot (a corrupt one is deleted from the shared tier)."""
        try:
            restored = await self.local_call(lambda: self.load(sid, blob, self.shared_name))
        except RestoreError as e:
            await self.after_shared_load(sid, e)
            raise
        await self.after_shared_load(sid, None)
        return restored

    async def after_shared_load(self, sid: str, error: RestoreError | None) -> None:
        """After a shared copy was loaded (`error` None) or refused: a copy that failed to decode is
        deleted so it is never tried again; a loaded one stays as a fallback unless `keep_redis_copy`
        is off. Best effort: a stale copy left by a failure here expires with the TTL."""
        if error is not None and not isinstance(error.cause, CodecError):
            return
        if error is None and self.config.keep_redis_copy:
            return
        with contextlib.suppress(CacheStoreError):
            await self.shared_call("DEL", self.shared.delete(sid))

    # --- delete / transcripts ---------------------------------------------------------------
    async def delete(self, sid: str) -> None:
        """Free the session in every tier, transcript included."""
        async with self._lock:
            await self.local_call(lambda: self.drop_local_copies(sid))
            if self.shared:
                await self.shared_call("DEL", self.shared.delete(sid))
            await self.shared_call("DEL transcript", self.transcripts.delete(sid))

    async def forget_cache(self, sid: str) -> None:
        """Drop the session's cache in every tier, device included, but keep its transcript (the
        next turn rebuilds it: tests and benchmarks of the recompute path use this)."""
        async with self._lock:
            await self.local_call(lambda: self.drop_local_copies(sid))
            if self.shared:
                with contextlib.suppress(TierUnavailableError):  # a stale shared copy carries its own transcript
                    await self.shared_call("DEL", self.shared.delete(sid))

    async def drop_local(self, sid: str) -> None:
        """Drop the session's device and host copies only (the shared tier and transcript stay)."""
        await self.local_call(lambda: self.drop_local_copies(sid))

    async def put_transcript(self, sid: str, transcript: dict) -> None:
        await self.shared_call("SET transcript", self.transcripts.put(sid, transcript))

    async def get_transcript(self, sid: str) -> dict:
        return await self.shared_call("GET transcript", self.transcripts.get(sid))

    # --- stats ------------------------------------------------------------------------------
    async def stats(self) -> dict[str, dict]:
        """Per tier: sessions and bytes held now, hits, misses, restores, recomputes. A tier whose
        backend is down reports sessions and bytes as None and its error under "error"."""
        out, c = await self.run_local(lambda: (self.local_stats(), dataclasses.replace(self.counters[self.shared_name])
                                                                        if self.shared else None))
        if self.shared:
            c.misses += self.shared_misses
            try:
                held = await self.shared_call("stats", self.shared.stats())
                out[self.shared_name] = TierStats(held.sessions, held.bytes, c.hits, c.misses, c.restores,
                                                  c.recomputes).to_dict()
            except TierUnavailableError as e:
                out[self.shared_name] = {**c.to_dict(), "sessions": None, "bytes": None, "error": str(e)}
        out["total"] = {"recomputes": self.recomputes_total, "dropped": self.dropped_total}
        return out

    async def close(self) -> None:
        for tier in self.local.values():
            tier.close()
        if self.shared:
            await self.shared.close()
