"""Backpressure on one worker: at most `slots` turns run at once (each pins one device slot), up to
`depth` more wait in arrival order for at most `max_wait_s`; past that, a CapacityError (the
router answers 503 with Retry-After). While a turn waits, the sessions that are not running stay
evictable, so a slot frees as soon as any running turn ends.

Lives on the worker actor's event loop (asyncio only, no threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from lessserve.errors.tree import CapacityError


class QueueFullError(CapacityError):
    """Every slot is busy and the wait queue is full."""


class QueueTimeoutError(CapacityError):
    """No slot freed within the queue's wait limit."""


class SessionBusyError(CapacityError):
    """The session's previous turn still ran when the turn's wait limit passed."""


class TurnGate:
    def __init__(self, slots: int, depth: int, max_wait_s: float):
        self.slots, self.depth, self.max_wait_s = slots, depth, max_wait_s
        self._sem = asyncio.Semaphore(slots)
        self.running = 0
        self.waiting = 0
        self.waits_total = 0  # turns that had to wait
        self.wait_seconds_total = 0.0
        self.rejected_total = 0

    def deadline(self) -> float:
        """The latest loop time a turn arriving now may start: its waits (for its session's previous
        turn, then for a slot) share the one limit, max_wait_s."""
        return asyncio.get_running_loop().time() + self.max_wait_s

    @contextlib.asynccontextmanager
    async def admit(self, deadline: float | None = None) -> AsyncIterator[None]:
        wait_s = self.max_wait_s if deadline is None else max(deadline - asyncio.get_running_loop().time(), 0.0)
        if self._sem.locked() or self.waiting:
            if self.waiting >= self.depth:
                self.rejected_total += 1
                raise QueueFullError(f"all {self.slots} session slots are busy and {self.waiting} turns wait; "
                                     "retry shortly")
            self.waiting += 1
            self.waits_total += 1
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(self._sem.acquire(), wait_s)
            except TimeoutError:
                self.rejected_total += 1
                raise QueueTimeoutError(f"no session slot freed within {self.max_wait_s:g} s; retry shortly") from None
            finally:
                self.waiting -= 1
                self.wait_seconds_total += time.monotonic() - t0
        else:
            await self._sem.acquire()
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._sem.release()

    def stats(self) -> dict:
        return {"running": self.running, "waiting": self.waiting, "waits_total": self.waits_total,
                "wait_seconds_total": round(self.wait_seconds_total, 6), "rejected_total": self.rejected_total}
