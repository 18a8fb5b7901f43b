"""The serving cluster's one configuration (pydantic), resolved once by `load_config`.

Precedence, later wins: the field defaults < a YAML file (`--config`) < LESSSERVE_* environment
variables < explicit overrides (the CLI's flags). `lessserve serve` resolves it in its own process
and deploys the result as it is (`cluster.app.app_from_config`): nothing applies a source again, so
`LESSSERVE_BUDGET=64 lessserve serve --budget 128` serves budget 128. The Serve import path
(`build_app(args)`: `serve run`, `serve deploy`, a RayService) reads its application `args` in
place of the file, with the environment on top (secrets such as a Redis password stay in the
environment). `api_keys` is never read from the environment into the config: every replica reads
LESSSERVE_API_KEYS itself (`ServeConfig.keys`).

A config file may be a plain mapping of these fields or a Ray Serve config file whose first
application's `args` hold them, so the same file works with `lessserve serve --config`,
`serve run` and `serve deploy` (import path `lessserve.cluster.app:build_app`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from lessserve.cache_store.config import StoreConfig
from lessserve.cluster.quotas import QuotaConfig
from lessserve.workers.config import EngineConfig

IMPORT_PATH = "lessserve.cluster.app:build_app"


class ScalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_workers: int = Field(1, ge=0, description="Fewest GPU/CPU worker replicas")
    max_workers: int = Field(1, ge=1, description="Most worker replicas")
    initial_workers: int | None = Field(None, ge=0, description="Workers at start (default min_workers)")
    target_ongoing_requests: float = Field(4.0, gt=0, description="Autoscaler target of in-flight turns per worker")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _order(self):
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers {self.min_workers} > max_workers {self.max_workers}")
        return self


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig, description="Model, policy, budget, kernels")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Host tier, Redis URL, TTLs, quantize")
    workers: ScalingConfig = Field(default_factory=ScalingConfig, description="Worker count and autoscaling")
    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    served_model_name: str | None = Field(None, description="Model id clients send (default engine.model)")
    api_keys: list[str] = Field(default_factory=list, description="Accepted Bearer keys (prefer a file/env)")
    api_keys_file: str | None = Field(None, description="File with one API key per line")
    router_replicas: int = Field(1, ge=1, description="Ingress router replicas (stateless)")
    router_num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per router replica")
    router_max_ongoing_requests: int = Field(512, ge=1, description="Requests one router replica serves at "
                                             "once (Serve's max_ongoing_requests; its default 5 queued /healthz "
                                             "behind 5 streams)")
    router_max_queued_requests: int = Field(1024, ge=-1, description="Requests that may wait for a router "
                                            "replica beyond those (Serve's max_queued_requests; more: 503; -1: "
                                            "unbounded)")
    router_max_turns: int = Field(480, ge=1, description="Turns (POST /v1 requests, streams until they end) one "
                                  "router replica serves at once; more: 503 with Retry-After. Below "
                                  "router_max_ongoing_requests, so health checks, metrics and lookups never queue "
                                  "behind turns")
    worker_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per worker replica")
    worker_num_gpus: float | None = Field(None, ge=0, description="GPUs per worker (None: 1 if the cluster has any)")
    worker_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources each worker "
                                               "replica asks for (e.g. {worker_node: 1}: one per GPU node group)")
    router_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources each router "
                                               "replica asks for (e.g. pin routers to the head node)")
    max_ongoing_per_worker: int = Field(64, ge=1, description="Serve max_ongoing_requests per worker")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest accepted request body")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    drain_timeout_s: float = Field(60.0, gt=0, description="Time a leaving worker has to offload its sessions")
    queue_depth: int = Field(64, ge=0, description="Turns that may wait per worker when every slot is busy "
                             "(more: 503 with Retry-After)")
    queue_max_wait_s: float = Field(30.0, gt=0, description="Longest a turn waits for a slot before a 503")
    responses_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="Lifetime of a stored response record "
                                 "(POST /v1/responses, store: true)")
    responses_max_records: int = Field(100_000, ge=1, description="Most response records kept without Redis "
                                       "(oldest dropped first)")
    quotas: QuotaConfig = Field(default_factory=QuotaConfig, description="Per API key limits (cluster/quotas.py)")
    turn_retries: int = Field(2, ge=0, le=10, description="Times the router retries a turn on another worker "
                              "when its worker died before the first token")
    maintain_interval_s: float = Field(5.0, gt=0, description="Worker tier-maintenance period")

    @model_validator(mode="after")
    def _room_for_probes(self):
        if self.router_max_turns >= self.router_max_ongoing_requests:
            raise ValueError(f"router_max_turns {self.router_max_turns} must be below router_max_ongoing_requests "
                             f"{self.router_max_ongoing_requests}: probes and metrics need room beside the turns")
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.model

    def keys(self) -> set[str]:
        keys = set(self.api_keys)
        if self.api_keys_file:
            keys |= {k.strip() for k in Path(self.api_keys_file).read_text().splitlines() if k.strip()}
        keys |= {k.strip() for k in os.environ.get("LESSSERVE_API_KEYS", "").split(",") if k.strip()}
        return keys


ENV_PREFIX = "LESSSERVE_"
SHORT_ENV = {  # short names kept as aliases of the nested ones (LESSSERVE_ENGINE__BUDGET, ...)
    "LESSSERVE_MODEL": "engine.model",
    "LESSSERVE_POLICY": "engine.policy",
    "LESSSERVE_BUDGET": "engine.budget",
    "LESSSERVE_KERNELS": "engine.kernels",
    "LESSSERVE_REDIS_URL": "store.redis_url",
}
NOT_FROM_ENV = ("api_keys",)  # read at run time by each replica (ServeConfig.keys), never copied into args


class _Env(EnvSettingsSource):
    """pydantic-settings' env source (nested fields as LESSSERVE_SECTION__FIELD) over a given mapping."""

    def __init__(self, env: Mapping[str, str]):
        self._given = env
        super().__init__(_EnvSchema, case_sensitive=False, env_prefix=ENV_PREFIX, env_nested_delimiter="__")

    def _load_env_vars(self):
        return {k.lower(): v for k, v in self._given.items()}

    def get_field_value(self, field, field_name):
        if field_name in NOT_FROM_ENV:
            return None, field_name, False
        return super().get_field_value(field, field_name)


def _set(d: dict, dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for p in path:
        d = d.setdefault(p, {})
    d[last] = value


def _merge(into: dict, top: dict) -> dict:
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into


def env_layer(env: Mapping[str, str]) -> dict:
    """The config fields LESSSERVE_* variables set: short aliases, then the nested names on top."""
    out: dict = {}
    for var, dotted in SHORT_ENV.items():
        if env.get(var):
            _set(out, dotted, env[var])
    return _merge(out, _Env(env)())


class _EnvSchema(ServeConfig, BaseSettings):
    """ServeConfig's fields as pydantic-settings sees them (the schema its env source reads)."""

    model_config = SettingsConfigDict(extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="__")


def read_config_file(path: str | Path) -> dict:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    if "applications" in data:  # a Ray Serve config file
        apps = [a for a in data["applications"] if a.get("import_path") == IMPORT_PATH]
        if not apps:
            raise ValueError(f"{path}: no application with import_path {IMPORT_PATH}")
        data = apps[0].get("args") or {}
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                env: Mapping[str, str] | None = None, base: dict | None = None) -> ServeConfig:
    """Defaults < file (or `base`, e.g. Serve application args) < LESSSERVE_* env < explicit
    overrides (dotted keys, None = unset). Env on top of args lets a deployment keep secrets such
    as a Redis URL with a password in a Secret rather than in its Serve config. Call it once per
    process: the result is final (a second call over it would put the env above the overrides)."""
    data = read_config_file(path) if path else copy.deepcopy(base or {})
    _merge(data, env_layer(os.environ if env is None else env))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(data, dotted, value)
    return ServeConfig.model_validate(data)


def serve_config_document(cfg: ServeConfig, name: str = "lessserve") -> dict:
    """A Ray Serve config (for `serve deploy` / a RayService's serveConfigV2) carrying `cfg`."""
    return {
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{
            "name": name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": cfg.model_dump(mode="json", exclude={"api_keys"}),
        }],
    }
