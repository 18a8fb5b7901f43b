"""Per API key quotas, so that no key's traffic or storage crowds out the others. Nothing applies
in open mode (no API keys: every request is one owner).

  max_concurrent_turns   turns (streams included) in flight per key, per router replica: over it,
                         429 with Retry-After (RateQuotaError)
  max_sessions           chat sessions per key (directory entries under the key's session ids,
                         which expire with their transcripts): a new session over it is 403
  max_responses          stored Responses records per key: a new stored response over it is 403
  max_response_bytes     bytes of a key's stored records: likewise 403 (HardQuotaError)

Counts of sessions and records come from the shared state (one bounded scan of the key's prefix,
`KV.used`), cached per key for `count_ttl_s` and advanced locally meanwhile; when the shared state
is unreachable the storage quotas are not checked (the request goes on, degraded).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field

from lessserve.errors.tree import DependencyUnavailableError, QuotaError
from lessserve.workers.session_ids import OPEN_OWNER

RETRY_AFTER_S = 1


class RateQuotaError(QuotaError):
    """A key has too many turns in flight: a retry after the others finish succeeds (429)."""


class HardQuotaError(QuotaError):
    """A key holds as many sessions or stored responses (or bytes) as it may (403)."""


class _Counted:
    """A turn's events that give back the key's place once, when they end or are closed (started
    or not)."""

    def __init__(self, events: AsyncIterator, release: Callable[[], None]):
        self.events, self._release = events, release

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await anext(self.events)
        except BaseException:  # the end (StopAsyncIteration), an error or a cancellation
            self._done()
            raise

    def _done(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    async def aclose(self) -> None:
        self._done()
        if hasattr(self.events, "aclose"):
            await self.events.aclose()

    def __del__(self):  # never iterated to its end nor closed: still given back
        self._done()


class QuotaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_concurrent_turns: int | None = Field(16, ge=1, description="Turns (streams included) in flight per API "
                                             "key on one router replica; more: 429 with Retry-After (None = no limit)")
    max_sessions: int | None = Field(10_000, ge=1, description="Chat sessions per API key (they expire with their "
                                     "transcripts); a new one past it: 403 (None = no limit)")
    max_responses: int | None = Field(10_000, ge=1, description="Stored Responses records per API key; a new "
                                      "stored response past it: 403 (None = no limit)")
    max_response_bytes: int | None = Field(256 << 20, ge=1 << 10, description="Bytes of an API key's stored "
                                           "Responses records; a new stored response past it: 403 (None = no limit)")
    count_ttl_s: float = Field(10.0, gt=0, description="How long a key's counted sessions / records are reused")


Counter = Callable[[str], Awaitable[tuple[int, int]]]  # owner -> (items, bytes) in the shared state


class KeyQuotas:
    def __init__(self, cfg: QuotaConfig, count_sessions: Counter, count_responses: Counter,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg, self.clock = cfg, clock
        self._counters = {"sessions": count_sessions, "responses": count_responses}
        self._counted: dict[tuple[str, str], tuple[float, int, int]] = {}  # (kind, owner) -> (at, items, bytes)
        self.in_flight: dict[str, int] = {}

    # --- turns in flight (this router replica) --------------------------------------------------
    def guard(self, owner: str, events: AsyncIterator) -> AsyncIterator:
        """`events` of a turn, counted against the key's turns in flight until they end (or are
        closed: the client went away). RateQuotaError at once when the key is at its limit."""
        most = self.cfg.max_concurrent_turns
        if owner == OPEN_OWNER or most is None:
            return events
        held = self.in_flight.get(owner, 0)
        if held >= most:
            raise RateQuotaError(f"this API key has {held} turns in flight (its limit is {most}); retry when one "
                                 "ends")
        self.in_flight[owner] = held + 1
        return _Counted(events, lambda: self._release(owner))

    def _release(self, owner: str) -> None:
        n = self.in_flight.get(owner, 1) - 1
        if n:
            self.in_flight[owner] = n
        else:
            self.in_flight.pop(owner, None)

    # --- storage (the shared state) ------------------------------------------------------------
    async def _count(self, kind: str, owner: str) -> tuple[int, int] | None:
        now, key = self.clock(), (kind, owner)
        hit = self._counted.get(key)
        if hit and now - hit[0] < self.cfg.count_ttl_s:
            return hit[1], hit[2]
        try:
            items, nbytes = await self._counters[kind](owner)
        except DependencyUnavailableError:
            return None
        self._counted[key] = (now, items, nbytes)
        return items, nbytes

    def _added(self, kind: str, owner: str, nbytes: int = 0) -> None:
        at, items, total = self._counted.get((kind, owner), (self.clock(), 0, 0))
        self._counted[(kind, owner)] = (at, items + 1, total + nbytes)

    async def new_session(self, owner: str) -> None:
        """A key starts a session: HardQuotaError at its limit."""
        most = self.cfg.max_sessions
        if owner == OPEN_OWNER or most is None:
            return
        counted = await self._count("sessions", owner)
        if counted is not None and counted[0] >= most:
            raise HardQuotaError(f"this API key holds {counted[0]} sessions (its limit is {most}); delete some "
                                 "(DELETE /v1/sessions/{id}) or wait for idle ones to expire")
        self._added("sessions", owner)

    async def new_response(self, owner: str, nbytes: int = 0) -> None:
        """A key stores a response record: HardQuotaError at its count or byte limit."""
        most, most_bytes = self.cfg.max_responses, self.cfg.max_response_bytes
        if owner == OPEN_OWNER or (most is None and most_bytes is None):
            return
        counted = await self._count("responses", owner)
        if counted is not None:
            items, total = counted
            if most is not None and items >= most:
                raise HardQuotaError(f"this API key stores {items} responses (its limit is {most}); delete some "
                                     "(DELETE /v1/responses/{id}) or send store: false")
            if most_bytes is not None and total + nbytes > most_bytes:
                raise HardQuotaError(f"this API key's stored responses take {total} bytes (its limit is "
                                     f"{most_bytes}); delete some or send store: false")
        self._added("responses", owner, nbytes)
