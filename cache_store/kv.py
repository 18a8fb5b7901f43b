"""The shared-state interface: a small async key-value store with TTLs and byte accounting.

Every piece of state the workers and routers share (session caches of the shared tier, durable
transcripts, the session directory, Responses records) is a typed view over one `KV`:
`RedisKV` (cache_store/redis_kv.py) when Redis is configured, `ActorKV` over the cluster-state
actor without it (cluster/actor_kv.py), `MemoryKV` in one process. Keys are str, values bytes.

Contract (tests/cache_store/test_kv_conformance.py holds every implementation to it):
- A TTL is in seconds (fractions allowed); None means no expiry, and a `set` without one clears
  an earlier expiry. An expired key reads as absent everywhere.
- `swap` and `pop` are atomic: the pointer flip the shared tier relies on (SET ... GET, GETDEL).
- `cas` is atomic: a read-modify-write (the session directory) writes only over what it read.
- `keys` lists at most `limit` keys (one bounded scan); `used` counts keys and value bytes.
- `epoch` changes when the backend lost its contents (a Redis restart, a new state actor).
- Every call of a remote backend is bounded by its timeout; every backend failure, a timeout
  included, raises TierUnavailableError (a DependencyUnavailableError). Nothing returns None
  where an error belongs.
"""

from __future__ import annotations

import abc
import heapq
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from lessserve.cache_store.errors import TierUnavailableError

Value = bytes | bytearray | memoryview | str
KEYS_LIMIT = 100_000  # the most keys one `keys` / `used` call lists


def as_bytes(v: Value) -> bytes:
    return v.encode() if isinstance(v, str) else bytes(v)


def matches(key: str, prefix: str, suffix: str) -> bool:
    """What Redis' MATCH `<prefix>*<suffix>` selects."""
    return len(key) >= len(prefix) + len(suffix) and key.startswith(prefix) and key.endswith(suffix)


class KV(abc.ABC):
    name: str  # reported as the shared tier's name: "redis", "cluster", "memory"

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Values in the order of `keys` (None where absent), in one round trip."""

    @abc.abstractmethod
    async def set(self, key: str, value: Value, ttl_s: float | None = None) -> None: ...

    @abc.abstractmethod
    async def set_many(self, items: Mapping[str, Value], ttl_s: float | None = None) -> None:
        """Every item, in one round trip (not atomic: a failure may leave some written)."""

    @abc.abstractmethod
    async def swap(self, key: str, value: Value, ttl_s: float | None = None) -> bytes | None:
        """Set `key` and return its previous value, atomically."""

    @abc.abstractmethod
    async def pop(self, key: str) -> bytes | None:
        """Delete `key` and return its value, atomically."""

    @abc.abstractmethod
    async def cas(self, key: str, expect: Value | None, value: Value, ttl_s: float | None = None) -> bool:
        """Set `key` to `value` only if it still holds `expect` (None: only if absent), atomically;
        whether it was set."""

    @abc.abstractmethod
    async def delete(self, *keys: str) -> int:
        """How many of `keys` existed."""

    @abc.abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def keys(self, prefix: str = "", suffix: str = "", limit: int = KEYS_LIMIT) -> list[str]:
        """Keys that start with `prefix` and end with `suffix`, at most `limit` of them."""

    @abc.abstractmethod
    async def epoch(self) -> str:
        """Changes whenever the backend lost its contents."""

    @abc.abstractmethod
    async def used(self, prefix: str = "") -> tuple[int, int]:
        """(keys, bytes of their values) under `prefix` (bounded like `keys`)."""

    async def cap(self, prefix: str, max_keys: int) -> None:  # noqa: B027 - optional
        """Keep at most `max_keys` keys under `prefix`, the least recently written dropped first.
        In-process maps honour it; Redis is bounded by its own `maxmemory` policy instead."""

    async def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""


class KVFullError(TierUnavailableError):
    """A capped in-process map is full of values it may not evict (a write refused, as Redis'
    noeviction refuses it): the caller degrades as when Redis is down."""


class KVMap:
    """Bytes by key with expiry, byte accounting, per-prefix key caps and an optional byte cap: the
    synchronous map behind MemoryKV and the cluster-state actor (ActorKV). Expired keys are dropped
    when read and by a sweep on writes (a heap of expiry times), so memory never holds them long.

    `max_bytes`: values beyond it first evict the least recently written keys that `evictable(key)`
    allows (the shared tier's cache copies: a session whose copy goes is rebuilt from its
    transcript), and a write that still does not fit is refused (KVFullError); transcripts,
    directory entries and response records are never evicted."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_bytes: int | None = None,
                 evictable: Callable[[str], bool] = lambda key: False):
        self.clock = clock
        self.max_bytes, self.evictable = max_bytes, evictable
        self._lru: OrderedDict[str, None] = OrderedDict()  # evictable keys, least recently written first
        self._lru_bytes = 0  # bytes of their values
        self.evicted_keys = self.evicted_bytes = self.refused_writes = 0
        self.epoch = uuid.uuid4().hex
        self._d: dict[str, bytes] = {}
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._caps: dict[str, tuple[int, OrderedDict[str, None]]] = {}  # prefix -> (max keys, write order)
        self.bytes = 0

    def __len__(self) -> int:
        self._sweep()
        return len(self._d)

    def _alive(self, key: str) -> bool:
        t = self._expiry.get(key)
        if t is not None and t <= self.clock():
            self._drop(key)
            return False
        return key in self._d

    def _drop(self, key: str) -> bytes | None:
        v = self._d.pop(key, None)
        if v is not None:
            self.bytes -= len(v)
        self._expiry.pop(key, None)
        if key in self._lru:
            del self._lru[key]
            self._lru_bytes -= len(v or b"")
        for _, order in self._caps.values():
            order.pop(key, None)
        return v

    def _sweep(self) -> None:
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            t, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == t:
                self._drop(key)
        if len(self._heap) > 2 * len(self._expiry) + 1024:  # stale entries of rewritten keys
            self._heap = [(t, k) for k, t in self._expiry.items()]
            heapq.heapify(self._heap)

    def get(self, key: str) -> bytes | None:
        return self._d[key] if self._alive(key) else None

    def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    def _make_room(self, key: str, grow: int) -> None:
        """Evict least recently written evictable keys until `grow` more bytes fit (KVFullError if not)."""
        if self.max_bytes is None or self.bytes + grow <= self.max_bytes:
            return
        others = self._lru_bytes - (len(self._d.get(key, b"")) if key in self._lru else 0)
        if self.bytes + grow - others > self.max_bytes:  # evicting every copy would not do: evict none
            self.refused_writes += 1
            raise KVFullError(f"the shared state is full ({self.bytes} of {self.max_bytes} bytes, "
                              f"{others} of them evictable): {key!r} not written")
        while self.bytes + grow > self.max_bytes:
            victim = next(k for k in self._lru if k != key)
            self.evicted_bytes += len(self._d.get(victim, b""))
            self.evicted_keys += 1
            self._drop(victim)

    def set(self, key: str, value: Value, ttl_s: float | None = None) -> None:
        self._sweep()
        v = as_bytes(value)
        old = len(self._d.get(key, b""))
        self._make_room(key, len(v) - old)
        self.bytes += len(v) - old
        self._d[key] = v
        if key in self._lru:
            self._lru_bytes -= old
        if self.evictable(key):
            self._lru[key] = None
            self._lru.move_to_end(key)
            self._lru_bytes += len(v)
        if ttl_s is None:
            self._expiry.pop(key, None)
        else:
            t = self.clock() + ttl_s
            self._expiry[key] = t
            heapq.heappush(self._heap, (t, key))
        for prefix, (most, order) in self._caps.items():
            if key.startswith(prefix):
                order[key] = None
                order.move_to_end(key)
                while len(order) > most:
                    self._drop(next(iter(order)))

    def set_many(self, items: Mapping[str, Value], ttl_s: float | None = None) -> None:
        for k, v in items.items():
            self.set(k, v, ttl_s)

    def swap(self, key: str, value: Value, ttl_s: float | None = None) -> bytes | None:
        old = self.get(key)
        self.set(key, value, ttl_s)
        return old

    def pop(self, key: str) -> bytes | None:
        return self._drop(key) if self._alive(key) else None

    def cas(self, key: str, expect: Value | None, value: Value, ttl_s: float | None = None) -> bool:
        if self.get(key) != (None if expect is None else as_bytes(expect)):
            return False
        self.set(key, value, ttl_s)
        return True

    def delete(self, *keys: str) -> int:
        return sum(self.pop(k) is not None for k in dict.fromkeys(keys))

    def exists(self, key: str) -> bool:
        return self._alive(key)

    def keys(self, prefix: str = "", suffix: str = "", limit: int = KEYS_LIMIT) -> list[str]:
        self._sweep()
        out = []
        for k in self._d:
            if matches(k, prefix, suffix):
                out.append(k)
                if len(out) >= limit:
                    break
        return out

    def used(self, prefix: str = "") -> tuple[int, int]:
        self._sweep()
        if not prefix:
            return len(self._d), self.bytes
        keys = self.keys(prefix)
        return len(keys), sum(len(self._d[k]) for k in keys)

    def cap(self, prefix: str, max_keys: int) -> None:
        order = OrderedDict((k, None) for k in self._d if k.startswith(prefix))
        self._caps[prefix] = (max_keys, order)
        while len(order) > max_keys:
            self._drop(next(iter(order)))


class MemoryKV(KV):
    """One process's KV (the embedded default without Redis; unit tests). In memory: it cannot
    hang or fail, so it has no timeout."""

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.map = KVMap(clock)

    async def get(self, key: str) -> bytes | None:
        return self.map.get(key)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return self.map.get_many(keys)

    async def set(self, key: str, value: Value, ttl_s: float | None = None) -> None:
        self.map.set(key, value, ttl_s)

    async def set_many(self, items: Mapping[str, Value], ttl_s: float | None = None) -> None:
        self.map.set_many(items, ttl_s)

    async def swap(self, key: str, value: Value, ttl_s: float | None = None) -> bytes | None:
        return self.map.swap(key, value, ttl_s)

    async def pop(self, key: str) -> bytes | None:
        return self.map.pop(key)

    async def cas(self, key: str, expect: Value | None, value: Value, ttl_s: float | None = None) -> bool:
        return self.map.cas(key, expect, value, ttl_s)

    async def delete(self, *keys: str) -> int:
        return self.map.delete(*keys)

    async def exists(self, key: str) -> bool:
        return self.map.exists(key)

    async def keys(self, prefix: str = "", suffix: str = "", limit: int = KEYS_LIMIT) -> list[str]:
        return self.map.keys(prefix, suffix, limit)

    async def epoch(self) -> str:
        return self.map.epoch

    async def used(self, prefix: str = "") -> tuple[int, int]:
        return self.map.used(prefix)

    async def cap(self, prefix: str, max_keys: int) -> None:
        self.map.cap(prefix, max_keys)
