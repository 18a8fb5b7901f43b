"""`lessserve serve`'s pre-flight: what the CLI can check in its own process, before Ray starts.

A failed check raises CliError naming the flag (or, where there is none, the config field) of the
value to blame: one line and exit code 2 (cli/main.py), in seconds, instead of a replica failing in
its constructor after Ray and Serve have started. What must not stop the start comes back as
warnings: an unreachable Redis (the cluster serves degraded without it, docs/reliability.md) and
open mode (no API keys).

The checks about this machine (the port, CPUs and GPUs, the device, the model files, the LESS
weights) run only when `serve` starts its own local Ray: with --address (or RAY_ADDRESS) the
workers run on other nodes, which this process cannot see.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import sys
from pathlib import Path

from lessserve.cli.flags import CliError
from lessserve.cli.serve import SERVE_FLAGS
from lessserve.cluster.config import ServeConfig
from lessserve.errors.tree import LessServeError
from lessserve.workers.config import EngineConfig

PROG = "lessserve serve"


def blame(field: str) -> str:
    """The flag that sets a ServeConfig field (dotted), else the field itself."""
    return next((flag for flag, f in SERVE_FLAGS.items() if f == field), field)


def check(cfg: ServeConfig, local: bool = True) -> list[str]:
    """Raise CliError at the first failed check (cheapest first); return the warnings to print."""
    check_redis_url(cfg.store.redis_url)
    if local:
        check_port(cfg.host, cfg.port)
        check_resources(cfg)
        device = check_device(cfg.engine.device)
        check_kernels(cfg.engine.kernels, device)
        model_id = check_model(cfg.engine.model, cfg.engine.max_model_len)
        check_less_weights(cfg.engine, model_id)
    return [w for w in (redis_warning(cfg.store.redis_url), open_mode_warning(cfg)) if w]


# --- hard checks -----------------------------------------------------------------------------
def check_redis_url(url: str | None) -> None:
    """The URL parses the way the workers' redis-py client will parse it (the value is not
    echoed: it may hold a password)."""
    if not url:
        return
    from redis.connection import parse_url

    try:
        parse_url(url)
    except ValueError as e:
        raise CliError(blame("store.redis_url"), str(e)) from None


def check_port(host: str, port: int) -> None:
    """Serve's HTTP proxy can listen on host:port (a bind test, with SO_REUSEADDR as uvicorn
    sets it: a port left in TIME_WAIT passes, one another process listens on does not)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise CliError(blame("host"), f"{host!r} does not resolve: {e.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise CliError(blame("port"), f"{host}:{port} is already in use by another process") from None
            if e.errno == errno.EACCES:
                raise CliError(blame("port"), f"no permission to listen on port {port} ({e.strerror})") from None
            raise CliError(blame("host"), f"cannot listen on {host}:{port}: {e.strerror}") from None


def local_cpus() -> float:
    """The CPUs a local `ray.init()` will offer (it reads cgroup limits too)."""
    try:
        from ray._private.utils import get_num_cpus

        return float(get_num_cpus())
    except Exception:  # noqa: BLE001 - a private Ray helper: fall back to the OS's count
        import os

        return float(os.cpu_count() or 1)


def check_resources(cfg: ServeConfig) -> None:
    """The replicas fit this machine: Ray would wait forever for CPUs or GPUs it does not have
    (`serve.run` never returns)."""
    workers = cfg.workers.initial_workers if cfg.workers.initial_workers is not None else cfg.workers.min_workers
    need = cfg.router_replicas * cfg.router_num_cpus + workers * cfg.worker_num_cpus
    have = local_cpus()
    if need > have + 1e-9:
        flag = blame("workers.min_workers") if workers > 1 else "worker_num_cpus"
        raise CliError(flag, f"{workers} worker(s) x {cfg.worker_num_cpus:g} CPU + "
                       f"{cfg.router_replicas} router(s) x {cfg.router_num_cpus:g} CPU need {need:g} CPUs; this "
                       f"machine has {have:g}, and Ray would wait for them forever (lower worker_num_cpus or the "
                       "number of workers)")
    if cfg.worker_num_gpus and workers:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if workers * cfg.worker_num_gpus > gpus:
            raise CliError("worker_num_gpus", f"{workers} worker(s) x {cfg.worker_num_gpus:g} GPU need "
                           f"{workers * cfg.worker_num_gpus:g} GPUs; this machine has {gpus}")


def check_device(name: str):
    """The engine's device exists here (engine.device: auto | cpu | cuda | cuda:N)."""
    import torch

    from lessserve.workers.engine import pick_device

    try:
        device = pick_device(name)
    except RuntimeError as e:
        raise CliError("engine.device", f"{name!r}: {e}") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            why = "torch was built without CUDA" if torch.version.cuda is None else "torch.cuda.is_available() is False"
            raise CliError("engine.device", f"{name!r}: no CUDA device on this machine ({why})")
        if device.index is not None and device.index >= n:
            raise CliError("engine.device", f"{name!r}: this machine has {n} CUDA device(s)")
    return device


def check_kernels(kernels: str, device) -> None:
    from lessserve.kernels.dispatch import resolve

    try:
        resolve(kernels, device)
    except LessServeError as e:
        raise CliError(blame("engine.kernels"), str(e)) from None


def _arch_check(config_json: Path):
    from lessserve.workers.model_loader import ModelArgs

    return ModelArgs.from_hf_config(json.loads(config_json.read_text()))


def check_model(model: str, max_model_len: int | None = None) -> str:
    """The model resolves to local weights of a supported architecture whose context holds
    `max_model_len`; returns its id (the name the worker finds shipped LESS weights by). A GGUF or
    hub checkpoint not converted yet is converted here, once, into the cache the workers read."""
    from lessserve.workers.errors import ModelNotFoundError
    from lessserve.workers.model_loader import resolve_model_folder

    flag = blame("engine.model")
    given = Path(model).expanduser()
    try:
        if (given / "config.json").is_file():
            _arch_check(given / "config.json")  # before any conversion of a folder
        model_id, folder = resolve_model_folder(model)
        args = _arch_check(folder / "config.json")
        if not any(folder.glob("*.safetensors")):
            raise ModelNotFoundError(f"no safetensors weights in {folder}")
        if max_model_len is not None and max_model_len > args.context_len:
            raise CliError("--max-model-len",
                           f"{max_model_len} exceeds the model's context of {args.context_len} tokens")
    except CliError:
        raise
    except LessServeError as e:
        raise CliError(flag, str(e)) from None
    except KeyError as e:
        raise CliError(flag, f"{model}: config.json lacks {e}") from None
    except Exception as e:  # noqa: BLE001 - a bad config.json or a failed conversion: transformers raises many types
        raise CliError(flag, f"{model}: {type(e).__name__}: {e}") from None
    return model_id


def check_less_weights(engine: EngineConfig, model_id: str) -> None:
    """A `+less` policy has LESS weights: the file given, or shipped ones for this model and policy
    (found the way the worker finds them), and they load."""
    from lessserve.workers.compression import Policy
    from lessserve.workers.less_weights import LessWeights, check_bound, model_fingerprint, shipped_weights_path
    from lessserve.workers.model_loader import load_checkpoint

    policy = Policy.parse(engine.policy)
    if not policy.less:
        return
    field = "engine.less_weights" if engine.less_weights else blame("engine.policy")
    try:
        path = engine.less_weights or shipped_weights_path(model_id, policy.base, engine.budget)
        ckpt = load_checkpoint(engine.model)  # config only: the weights stay on disk
        note = check_bound(LessWeights.load(path), model_fingerprint(ckpt.args, ckpt.folder), model_id, engine.budget)
        if note:
            print(f"{PROG}: note: {note}", file=sys.stderr)
    except LessServeError as e:
        raise CliError(field, str(e)) from None
    except Exception as e:  # noqa: BLE001 - a corrupt file: safetensors raises its own types
        raise CliError(field, f"{path}: {type(e).__name__}: {e}") from None


# --- warnings --------------------------------------------------------------------------------
def redis_warning(url: str | None, timeout_s: float = 2.0) -> str | None:
    """A line when Redis does not answer now: the cluster starts anyway and serves degraded."""
    if not url:
        return None
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
        return None
    except (redis.RedisError, OSError) as e:
        return (f"{PROG}: warning: {blame('store.redis_url')}: Redis does not answer from here ({e}); serving "
                "degraded until it does (no shared tier or session directory, docs/reliability.md)")
    finally:
        client.close()


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may be reachable from the network
        return False


def open_mode_warning(cfg: ServeConfig) -> str | None:
    """What open mode (no API keys) allows, said at start-up: one line on loopback, a banner on an
    address the network can reach."""
    if cfg.keys():
        return None
    where = f"http://{cfg.host}:{cfg.port}"
    what = ("can use every endpoint without a key: chat, read and delete any session and any stored "
            "response (all sessions share one namespace)")
    fix = "set --api-keys-file FILE or LESSSERVE_API_KEYS"
    if is_loopback(cfg.host):
        return f"{PROG}: warning: no API keys: open mode, anyone who can reach {where} on this machine {what}; {fix}"
    bar = "!" * 78
    return "\n".join([
        bar,
        f"{PROG}: WARNING: OPEN MODE ON A NETWORK ADDRESS: no API keys are configured and",
        f"  {where} listens beyond this machine: anyone who can reach it over the network",
        f"  {what}.",
        f"  To close it: {fix}, or --host 127.0.0.1.",
        bar,
    ])
