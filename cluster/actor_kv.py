"""ActorKV: the shared-state interface (cache_store/kv.py) over the cluster-state actor, the
cluster's shared state when no Redis is configured (its map: ClusterState.kv, a KVMap).

Each call is one actor call awaited under `timeout_s`; an actor that is dead, unreachable or too
slow fails the call with TierUnavailableError. The map lives on the head node and dies with it
(docs/reliability.md: use Redis in production).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from lessserve.cache_store.errors import TierUnavailableError
from lessserve.cache_store.kv import KEYS_LIMIT, KV, Value, as_bytes


class ActorKV(KV):
    name = "cluster"  # the shared tier's name without Redis

    def __init__(self, state, timeout_s: float = 5.0):
        self.state, self.timeout_s = state, timeout_s

    async def _call(self, method: str, *args):
        try:
            return await asyncio.wait_for(getattr(self.state, method).remote(*args), self.timeout_s)
        except TimeoutError as e:
            raise TierUnavailableError(f"cluster state actor {method}: no answer within {self.timeout_s:g} s") from e
        except Exception as e:  # noqa: BLE001 - actor death / network: one typed error
            raise TierUnavailableError(f"cluster state actor {method}: {type(e).__name__}: {e}") from e

    async def get(self, key: str) -> bytes | None:
        return await self._call("kv_get", key)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return await self._call("kv_get_many", list(keys)) if keys else []

    async def set(self, key: str, value: Value, ttl_s: float | None = None) -> None:
        await self._call("kv_set", key, as_bytes(value), ttl_s)

    async def set_many(self, items: Mapping[str, Value], ttl_s: float | None = None) -> None:
        if items:
            await self._call("kv_set_many", {k: as_bytes(v) for k, v in items.items()}, ttl_s)

    async def swap(self, key: str, value: Value, ttl_s: float | None = None) -> bytes | None:
        return await self._call("kv_swap", key, as_bytes(value), ttl_s)

    async def pop(self, key: str) -> bytes | None:
        return await self._call("kv_pop", key)

    async def cas(self, key: str, expect: Value | None, value: Value, ttl_s: float | None = None) -> bool:
        return await self._call("kv_cas", key, None if expect is None else as_bytes(expect), as_bytes(value), ttl_s)

    async def delete(self, *keys: str) -> int:
        return await self._call("kv_delete", list(keys)) if keys else 0

    async def exists(self, key: str) -> bool:
        return await self._call("kv_exists", key)

    async def keys(self, prefix: str = "", suffix: str = "", limit: int = KEYS_LIMIT) -> list[str]:
        return await self._call("kv_keys", prefix, suffix, limit)

    async def epoch(self) -> str:
        return await self._call("kv_epoch")

    async def used(self, prefix: str = "") -> tuple[int, int]:
        return tuple(await self._call("kv_used", prefix))

    async def cap(self, prefix: str, max_keys: int) -> None:
        await self._call("kv_cap", prefix, max_keys)
