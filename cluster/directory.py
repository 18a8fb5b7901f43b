"""Where each session's cache lives and who owns it: a view over the shared KV (Redis when
configured, else the cluster-state actor; cluster/shared_state.py), one JSON entry per session,
`lessserve:directory:<sid>` -> {"worker", "owner", "turns", "t"}, expiring with the session's
transcript (every claim refreshes it), so entries of sessions nobody continues are collected.
Every backend failure is one typed error, DirectoryUnavailableError; `WriteBehind` keeps a
worker's writes through an outage."""

from __future__ import annotations

import json
import time

from lessserve.cache_store.errors import unavailable_as
from lessserve.cache_store.kv import KV
from lessserve.errors.tree import DependencyUnavailableError

PREFIX = "lessserve:directory:"


class DirectoryUnavailableError(DependencyUnavailableError):
    """The session directory's backend (Redis, the cluster-state actor) did not answer."""


def merged_entry(old: dict | None, worker: str | None, owner: str | None, turns: int | None,
                 if_newer: bool) -> dict | None:
    """A session's directory entry after `worker` claims it: {"worker", "owner", "turns", "t"}.
    The owner never changes once set. `if_newer` (a re-publish after the backend lost its contents)
    claims only when no entry records more turns: a worker holding a stale copy never wins over
    the one that served the latest turn. None: the claim was refused."""
    e = dict(old or {"worker": None, "owner": owner})
    if if_newer and old and turns is not None and (old.get("turns") or 0) > turns:
        return None
    if worker is not None:
        e["worker"] = worker
    if owner is not None and e.get("owner") is None:
        e["owner"] = owner
    if turns is not None:
        e["turns"] = turns
    e["t"] = time.time()
    return e


CAS_TRIES = 8  # a claim raced by this many other writers in a row is reported as an outage


class SessionDirectory:
    """`place` reads, merges (merged_entry) and writes back with a compare-and-set (KV.cas): a claim
    never overwrites one it did not read, so a worker leaving (`leave`) cannot clear the claim another
    worker made meanwhile, and a stale re-publish cannot beat the latest turn's."""

    def __init__(self, kv: KV, prefix: str = PREFIX, ttl_s: float | None = None):
        self.kv, self.prefix, self.ttl_s = kv, prefix, ttl_s

    async def lookup(self, sid: str) -> dict | None:
        with unavailable_as(DirectoryUnavailableError):
            raw = await self.kv.get(self.prefix + sid)
        return json.loads(raw) if raw else None

    async def place(self, sid: str, worker: str | None = None, owner: str | None = None, turns: int | None = None,
                    if_newer: bool = False) -> dict | None:
        key = self.prefix + sid
        with unavailable_as(DirectoryUnavailableError):
            for _ in range(CAS_TRIES):
                raw = await self.kv.get(key)
                e = merged_entry(json.loads(raw) if raw else None, worker, owner, turns, if_newer)
                if e is None or await self.kv.cas(key, raw, json.dumps(e), self.ttl_s):
                    return e
        raise DirectoryUnavailableError(f"directory entry of {sid!r} changed under {CAS_TRIES} claims in a row")

    async def count(self, sid_prefix: str) -> tuple[int, int]:
        """(entries, bytes) of the sessions whose ids start with `sid_prefix` (one bounded scan)."""
        with unavailable_as(DirectoryUnavailableError):
            return await self.kv.used(self.prefix + sid_prefix)

    async def forget(self, sid: str) -> None:
        with unavailable_as(DirectoryUnavailableError):
            await self.kv.delete(self.prefix + sid)

    async def leave(self, worker: str) -> int:
        """A worker left (drained): its sessions now live only in the shared tier."""
        with unavailable_as(DirectoryUnavailableError):
            keys = await self.kv.keys(self.prefix)
            left = 0
            for k, raw in zip(keys, await self.kv.get_many(keys), strict=True):
                e = json.loads(raw) if raw else None
                if e and e.get("worker") == worker:  # unless another worker claimed it since the read
                    left += await self.kv.cas(k, raw, json.dumps({**e, "worker": None}), self.ttl_s)
        return left

    async def epoch(self) -> str:
        """Changes when the backend lost its contents (Redis restarted, a new state actor)."""
        with unavailable_as(DirectoryUnavailableError):
            return await self.kv.epoch()


class WriteBehind:
    """A worker's directory writes that survive an outage: a write that fails is kept (the latest
    per session) and replayed by `flush()`; `lookup` and `epoch` still raise, callers decide."""

    def __init__(self, directory):
        self.directory = directory
        self.pending: dict[str, tuple] = {}  # sid -> ("place", worker, owner, turns, if_newer) | ("forget",)
        self.failures = 0

    async def place(self, sid: str, worker: str, owner: str | None, turns: int | None = None,
                    if_newer: bool = False) -> None:
        await self._write(sid, ("place", worker, owner, turns, if_newer))

    async def count(self, sid_prefix: str) -> tuple[int, int]:
        """(entries, bytes) of the sessions whose ids start with `sid_prefix` (one bounded scan)."""
        with unavailable_as(DirectoryUnavailableError):
            return await self.kv.used(self.prefix + sid_prefix)

    async def forget(self, sid: str) -> None:
        await self._write(sid, ("forget",))

    async def _write(self, sid: str, op: tuple) -> None:
        self.pending.pop(sid, None)
        try:
            await self._apply(sid, op)
        except DirectoryUnavailableError:
            self.failures += 1
            self.pending[sid] = op

    async def _apply(self, sid: str, op: tuple) -> None:
        if op[0] == "place":
            await self.directory.place(sid, *op[1:])
        else:
            await self.directory.forget(sid)

    async def flush(self) -> int:
        """Replay kept writes in order; stops at the first failure. Returns how many are left."""
        for sid, op in list(self.pending.items()):
            try:
                await self._apply(sid, op)
            except DirectoryUnavailableError:
                break
            if self.pending.get(sid) == op:
                del self.pending[sid]
        return len(self.pending)

    async def leave(self, worker: str) -> int:
        return await self.directory.leave(worker)

    async def lookup(self, sid: str) -> dict | None:
        return await self.directory.lookup(sid)

    async def epoch(self) -> str:
        return await self.directory.epoch()
