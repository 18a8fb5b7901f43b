"""The shared tier: session caches every worker of the cluster reaches, over the shared KV
(Redis, or the cluster-state actor without it). Reported under the KV's name: "redis", "cluster".

A cache is written as parts of at most `part_bytes` under a fresh generation id, in one round trip,
and only then made visible by flipping the session's pointer key (`swap`, atomic). A write that
fails midway therefore leaves the previous generation readable; its stray parts expire with the
TTL. Keys (prefix p, session s, generation g):
  p:s:ptr      "g:nparts:nbytes"
  p:s:g:i      part i of the encoded cache
Backend failures raise TierUnavailableError; a pointer whose parts are gone raises CacheMissError.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Callable

from lessserve.cache_store.codec import Blob
from lessserve.cache_store.errors import CacheMissError, TierUnavailableError, TruncatedError
from lessserve.cache_store.kv import KV
from lessserve.cache_store.tier import Tier, TierStats

PTR = ":ptr"
_CACHE_KEY = re.compile(r"(:ptr|:[0-9a-f]{16}:\d+)$")


def cache_keys(prefix: str) -> Callable[[str], bool]:
    """Whether a key is one of this tier's cache keys under `prefix` (a pointer or a part, never a
    transcript): what a capped map may evict, since a session whose copy is gone is rebuilt."""
    head = f"{prefix}:"
    return lambda key: key.startswith(head) and _CACHE_KEY.search(key) is not None


def _parse_ptr(raw: bytes) -> tuple[str, int, int]:
    gen, nparts, nbytes = raw.decode().split(":")
    return gen, int(nparts), int(nbytes)


class SharedTier(Tier):
    def __init__(self, kv: KV, prefix: str = "lessserve:kv", ttl_s: float | None = None,
                 part_bytes: int = 16 << 20):
        self.kv, self.prefix, self.ttl_s, self.part_bytes = kv, prefix, ttl_s, part_bytes
        self.name = kv.name

    def _ptr(self, sid: str) -> str:
        return f"{self.prefix}:{sid}{PTR}"

    def _parts(self, sid: str, ptr: bytes) -> list[str]:
        gen, nparts, _ = _parse_ptr(ptr)
        return [f"{self.prefix}:{sid}:{gen}:{i}" for i in range(nparts)]

    async def contains(self, sid: str) -> bool:
        return await self.kv.exists(self._ptr(sid))

    async def _read(self, sid: str) -> bytes:
        ptr = await self.kv.get(self._ptr(sid))
        if ptr is None:
            raise CacheMissError(f"session {sid!r} is not in the {self.name} tier")
        gen, nparts, nbytes = _parse_ptr(ptr)
        parts = await self.kv.get_many(self._parts(sid, ptr))
        if any(x is None for x in parts):
            raise CacheMissError(f"session {sid!r}: parts of generation {gen} are gone (expired or replaced)")
        blob = parts[0] if nparts == 1 else b"".join(parts)
        if len(blob) != nbytes:
            raise TruncatedError(f"session {sid!r}: {len(blob)} bytes in the {self.name} tier, pointer says {nbytes}")
        return blob

    async def get(self, sid: str) -> Blob:
        try:
            return await self._read(sid)
        except CacheMissError:  # a concurrent writer may have flipped the pointer between our reads
            return await self._read(sid)

    async def put(self, sid: str, blob: Blob) -> None:
        mv = memoryview(blob).cast("B") if not isinstance(blob, memoryview) or blob.format != "B" else blob
        n, step = len(mv), self.part_bytes
        parts = [mv[i : i + step] for i in range(0, n, step)] or [mv[0:0]]
        ptr = f"{uuid.uuid4().hex[:16]}:{len(parts)}:{n}".encode()
        await self.kv.set_many(dict(zip(self._parts(sid, ptr), parts, strict=True)), self.ttl_s)
        old = await self.kv.swap(self._ptr(sid), ptr, self.ttl_s)
        if old is not None:
            await self._drop_parts(sid, old)

    async def _drop_parts(self, sid: str, ptr: bytes) -> None:
        """Best effort: parts left behind by a failure here expire with the TTL."""
        with contextlib.suppress(TierUnavailableError):
            await self.kv.delete(*self._parts(sid, ptr))

    async def delete(self, sid: str) -> bool:
        old = await self.kv.pop(self._ptr(sid))
        if old is None:
            return False
        await self._drop_parts(sid, old)
        return True

    async def keys(self) -> list[str]:
        head = f"{self.prefix}:"
        return [k[len(head) : -len(PTR)] for k in await self.kv.keys(head, PTR)]

    async def stats(self) -> TierStats:
        sids = await self.keys()
        if not sids:
            return TierStats()
        ptrs = await self.kv.get_many([self._ptr(s) for s in sids])
        sizes = [_parse_ptr(p)[2] for p in ptrs if p is not None]
        return TierStats(sessions=len(sizes), bytes=sum(sizes))

    async def close(self) -> None:
        await self.kv.close()
