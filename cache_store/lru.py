"""Eviction policy, separate from storage: which session a full tier should give up first."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable


class LRU:
    """Least recently used first. Pinned sessions (in use by a request) are never offered."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()

    def touch(self, sid: str) -> None:
        self._last[sid] = self._clock()
        self._last.move_to_end(sid)

    def stamp(self, sid: str) -> float | None:
        """The session's last use (None if not here): unchanged means unused since it was read."""
        return self._last.get(sid)

    def forget(self, sid: str) -> None:
        self._last.pop(sid, None)

    def __contains__(self, sid: str) -> bool:
        return sid in self._last

    def __len__(self) -> int:
        return len(self._last)

    def victims(self, pinned: Iterable[str] = ()) -> list[str]:
        """Unpinned sessions, least recently used first."""
        skip = set(pinned)
        return [s for s in self._last if s not in skip]

    def idle(self, older_than_s: float, pinned: Iterable[str] = ()) -> list[str]:
        """Unpinned sessions untouched for at least `older_than_s` seconds, oldest first."""
        now, skip = self._clock(), set(pinned)
        return [s for s, t in self._last.items() if s not in skip and now - t >= older_than_s]
