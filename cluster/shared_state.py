"""Where the cluster's shared state lives: the one place that chooses Redis or the actor.

`shared_kv(store)` is Redis (RedisKV) when `store.redis_url` is set, else the cluster-state actor
(ActorKV). Everything the workers and routers share is a typed view over what it returns: the
shared cache tier and transcripts (cache_store: SharedTier, Transcripts), the session directory
(cluster/directory.py) and Responses records (cluster/responses.py). Each event loop opens its own
(a redis-py client belongs to the loop that first uses it).
"""

from __future__ import annotations

from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.kv import KV
from lessserve.cache_store.redis_kv import RedisKV
from lessserve.cluster.actor_kv import ActorKV
from lessserve.cluster.state import get_state


def shared_kv(store: StoreConfig) -> KV:
    if store.redis_url:
        return RedisKV.from_config(store)
    return ActorKV(get_state(store), store.redis_timeout_s)
