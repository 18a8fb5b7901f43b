"""lessserve.cache_store: tiered session cache storage (device slots, host memory, Redis).

Knows nothing of Ray or of the engine: the worker plugs its device slots in as a DeviceTier.
"""

from lessserve.cache_store.codec import CacheIdentity, decode, encode, read_header
from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.errors import (
    BadMagicError,
    CacheMissError,
    CacheStoreError,
    ChecksumError,
    CodecError,
    FormatVersionError,
    IncompatibleCacheError,
    RestoreError,
    SessionPinnedError,
    TierFullError,
    TierUnavailableError,
    TruncatedError,
)
from lessserve.cache_store.host_tier import HostTier
from lessserve.cache_store.lru import LRU
from lessserve.cache_store.redis_tier import RedisTier
from lessserve.cache_store.store import Restored, TieredCacheStore
from lessserve.cache_store.tier import DeviceTier, Tier, TierStats

__all__ = [
    "BadMagicError", "CacheIdentity", "CacheMissError", "CacheStoreError", "ChecksumError", "CodecError",
    "DeviceTier", "FormatVersionError", "HostTier", "IncompatibleCacheError", "LRU", "RedisTier",
    "RestoreError", "Restored", "SessionPinnedError", "StoreConfig", "Tier", "TierFullError", "TierStats",
    "TierUnavailableError", "TieredCacheStore", "TruncatedError", "decode", "encode", "read_header",
]
