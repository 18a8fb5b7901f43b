"""Host-memory tier: encoded caches in (pinned, when CUDA is present) host buffers, bounded in bytes.

The tier only enforces its bound (a put that does not fit raises TierFullError); which session
to give up to make room is the store's eviction policy's decision.
"""

from __future__ import annotations

import torch

from lessserve.cache_store.codec import Blob
from lessserve.cache_store.errors import CacheMissError, TierFullError
from lessserve.cache_store.tier import LocalTier, TierStats


class HostTier(LocalTier):
    name = "host"

    def __init__(self, capacity_bytes: int, pin_memory: bool | None = None):
        self.capacity = capacity_bytes
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._bufs: dict[str, torch.Tensor] = {}  # sid -> uint8 [nbytes]
        self.used = 0

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    def fits(self, nbytes: int, replacing: str | None = None) -> bool:
        old = self._bufs[replacing].numel() if replacing in self._bufs else 0
        return self.used - old + nbytes <= self.capacity

    def contains(self, sid: str) -> bool:
        return sid in self._bufs

    def get(self, sid: str) -> Blob:
        try:
            buf = self._bufs[sid]
        except KeyError:
            raise CacheMissError(f"session {sid!r} is not in host memory") from None
        return memoryview(buf.numpy())

    def put(self, sid: str, blob: Blob) -> None:
        src = memoryview(blob).cast("B") if not isinstance(blob, memoryview) or blob.format != "B" else blob
        n = len(src)
        if not self.fits(n, replacing=sid):
            raise TierFullError(f"host tier: {n} bytes for {sid!r} do not fit "
                                f"({self.used} of {self.capacity} bytes used)")
        buf = torch.empty(n, dtype=torch.uint8, pin_memory=self.pin)  # [nbytes]
        memoryview(buf.numpy())[:] = src
        old = self._bufs.pop(sid, None)
        self.used += n - (old.numel() if old is not None else 0)
        self._bufs[sid] = buf

    def delete(self, sid: str) -> bool:
        old = self._bufs.pop(sid, None)
        if old is None:
            return False
        self.used -= old.numel()
        return True

    def keys(self) -> list[str]:
        return list(self._bufs)

    def stats(self) -> TierStats:
        return TierStats(sessions=len(self._bufs), bytes=self.used)

    def close(self) -> None:
        self._bufs.clear()
        self.used = 0
