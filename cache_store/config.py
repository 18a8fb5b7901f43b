"""Configuration of the tiered session cache store (pydantic): validated once, at the edge."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lessserve.errors.tree import ConfigError


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host_bytes: int = Field(1 << 30, ge=0, description="Bytes of host memory for offloaded session caches "
                            "(0 disables the host tier's storage: every offload goes on to Redis)")
    redis_url: str | None = Field(None, description="Redis URL of the shared state (redis://host:port/db, "
                                  "rediss://... for TLS, or unix://path); None = no Redis: the cluster-state actor "
                                  "(the embedded default)")
    redis_password: str | None = Field(None, repr=False, description="Redis AUTH password (requirepass), when "
                                       "the URL carries none (e.g. from LESSSERVE_STORE__REDIS_PASSWORD)")
    redis_password_file: str | None = Field(None, description="File holding the Redis AUTH password (a mounted "
                                            "Secret; one line), when neither the URL nor redis_password gives one")
    redis_prefix: str = Field("lessserve:kv", description="Key prefix of the session caches and transcripts "
                              "this store writes in the shared state (Redis or the cluster-state actor)")
    ttl_s: int | None = Field(24 * 3600, ge=1, description="Expiry of a session cache in Redis (None = never)")
    transcript_ttl_s: int | None = Field(7 * 24 * 3600, ge=1,
                                         description="Expiry of a session transcript in Redis (None = never)")
    part_bytes: int = Field(16 << 20, ge=1 << 12, description="Largest single Redis value: a cache is written as "
                            "parts of at most this size in one pipeline")
    redis_pool_size: int = Field(16, ge=1, description="Connections in the Redis connection pool")
    redis_timeout_s: float = Field(5.0, gt=0, description="Deadline of every shared-state call (Redis, or the "
                                   "cluster-state actor without it) and Redis' socket connect / read timeout: a "
                                   "hung backend fails the call after this long, like a dead one")
    device_idle_s: float | None = Field(60.0, gt=0, description="A session idle this long on the device moves to "
                                        "host memory at the next maintenance pass (None = only when slots run short)")
    host_idle_s: float | None = Field(600.0, gt=0, description="A session idle this long in host memory moves to "
                                      "Redis at the next maintenance pass (None = only under host pressure / drain)")
    keep_redis_copy: bool = Field(True, description="After a restore from Redis keep the Redis copy as a "
                                  "durable fallback (refreshed by the next offload, expires with ttl_s) "
                                  "instead of deleting it on the request path")
    state_max_bytes: int | None = Field(1 << 30, ge=1 << 20, description="Without Redis: most bytes of values the "
                                        "cluster-state actor keeps as the shared state; past it the shared tier's "
                                        "least recently written cache copies go (those sessions rebuild from their "
                                        "transcripts), then writes are refused like a full Redis (None = no cap)")
    quantize: bool = Field(False, description="Offload k/v as int8 + per-token scales (lossy, ~4x smaller in fp32)")

    @model_validator(mode="after")
    def _one_password(self):
        given = [name for name, on in (("store.redis_password", self.redis_password is not None),
                                       ("store.redis_password_file", self.redis_password_file is not None),
                                       ("store.redis_url's password",
                                        bool(self.redis_url and urlsplit(self.redis_url).password))) if on]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are both set: give the Redis password once")
        return self

    def password(self) -> str | None:
        """The Redis password from redis_password or redis_password_file (None: the URL's, or none)."""
        if self.redis_password_file is None:
            return self.redis_password
        try:
            return Path(self.redis_password_file).read_text().strip("\r\n")
        except OSError as e:
            raise ConfigError(f"store.redis_password_file: cannot read {self.redis_password_file}: {e}") from e
