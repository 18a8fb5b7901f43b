"""Configuration of the tiered session cache store (pydantic): validated once, at the edge."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host_bytes: int = Field(1 << 30, ge=0, description="Bytes of host memory for offloaded session caches "
                            "(0 disables the host tier's storage: every offload goes on to Redis)")
    redis_url: str | None = Field(None, description="Redis URL of the shared tier (redis://host:port/db or "
                                  "unix://path); None = no Redis tier (the embedded default)")
    redis_prefix: str = Field("lessserve:kv", description="Key prefix of every key this store writes in Redis")
    ttl_s: int | None = Field(24 * 3600, ge=1, description="Expiry of a session cache in Redis (None = never)")
    transcript_ttl_s: int | None = Field(7 * 24 * 3600, ge=1,
                                         description="Expiry of a session transcript in Redis (None = never)")
    part_bytes: int = Field(16 << 20, ge=1 << 12, description="Largest single Redis value: a cache is written as "
                            "parts of at most this size in one pipeline")
    redis_pool_size: int = Field(16, ge=1, description="Connections in the Redis connection pool")
    redis_timeout_s: float = Field(5.0, gt=0, description="Socket connect / read timeout for Redis")
    device_idle_s: float | None = Field(60.0, gt=0, description="A session idle this long on the device moves to "
                                        "host memory at the next maintenance pass (None = only when slots run short)")
    host_idle_s: float | None = Field(600.0, gt=0, description="A session idle this long in host memory moves to "
                                      "Redis at the next maintenance pass (None = only under host pressure / drain)")
    keep_redis_copy: bool = Field(True, description="After a restore from Redis keep the Redis copy as a "
                                  "durable fallback (refreshed by the next offload, expires with ttl_s) "
                                  "instead of deleting it on the request path")
    quantize: bool = Field(False, description="Offload k/v as int8 + per-token scales (lossy, ~4x smaller in fp32)")
