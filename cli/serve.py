"""`lessserve serve`: the serving cluster (embedded default: local Ray, one worker, CPU if no GPU)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from pydantic import ValidationError

from lessserve.cli.flags import CliError, existing_file, from_validation, help_of

# flag -> ServeConfig field (dotted): builds the overrides and names the flag of a bad value
SERVE_FLAGS = {"--host": "host", "--port": "port", "--redis-url": "store.redis_url", "--api-keys-file": "api_keys_file",
               "--model": "engine.model", "--policy": "engine.policy", "--budget": "engine.budget",
               "--kernels": "engine.kernels", "--max-slots": "engine.max_slots", "--workers": "workers.min_workers",
               "--max-workers": "workers.max_workers", "--dtype": "engine.dtype",
               "--max-model-len": "engine.max_model_len", "--served-model-name": "served_model_name",
               "--chat-template": "engine.chat_template", "--less-weights": "engine.less_weights",
               "--kv-bits": "engine.kv_bits"}


def register(sub) -> None:
    from lessserve.cluster.config import ServeConfig
    from lessserve.workers.config import EngineConfig

    p = sub.add_parser("serve", help="serve the OpenAI-compatible REST API")
    p.add_argument("--config", default=None, help="YAML: lessserve config or a Serve config file")
    p.add_argument("--host", default=None, help=help_of(ServeConfig, "host"))
    p.add_argument("--port", type=int, default=None, help=help_of(ServeConfig, "port"))
    p.add_argument("--redis-url", default=None, help="shared Redis tier and session directory (default: none)")
    p.add_argument("--workers", type=int, default=None, help="fixed number of workers")
    p.add_argument("--max-workers", type=int, default=None, help="autoscale up to this many workers")
    p.add_argument("--api-keys-file", default=None, help="file with one API key per line")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    p.add_argument("--model", default=None, help=help_of(EngineConfig, "model"))
    p.add_argument("--policy", default=None, help=help_of(EngineConfig, "policy"))
    p.add_argument("--budget", type=int, default=None, help=help_of(EngineConfig, "budget"))
    p.add_argument("--kernels", default=None, choices=["auto", "torch", "triton"],
                   help=help_of(EngineConfig, "kernels"))
    p.add_argument("--max-slots", type=int, default=None, help=help_of(EngineConfig, "max_slots"))
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help=help_of(EngineConfig, "dtype"))
    p.add_argument("--max-model-len", type=int, default=None, help=help_of(EngineConfig, "max_model_len"))
    p.add_argument("--served-model-name", default=None, help=help_of(ServeConfig, "served_model_name"))
    p.add_argument("--chat-template", default=None, help=help_of(EngineConfig, "chat_template"))
    p.add_argument("--less-weights", default=None, help=help_of(EngineConfig, "less_weights").split(";")[0] + ")")
    p.add_argument("--kv-bits", default=None, metavar="{native,8,4}", help=help_of(EngineConfig, "kv_bits"))
    p.set_defaults(func=run)


def config_from_args(args):
    from lessserve.cluster.config import load_config

    if args.config:
        existing_file("--config", args.config)
    if args.api_keys_file:
        existing_file("--api-keys-file", args.api_keys_file)
    if args.less_weights:
        existing_file("--less-weights", args.less_weights)
    over = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field in SERVE_FLAGS.items()}
    if args.workers is not None:
        over["workers.max_workers"] = args.workers
    if args.max_workers is not None:
        over["workers.max_workers"] = args.max_workers
    try:
        return load_config(args.config, over)
    except ValidationError as e:
        if not e.errors()[0]["loc"]:
            raise CliError("--config", str(e)) from None
        raise from_validation(e, SERVE_FLAGS) from None
    except (OSError, ValueError) as e:
        raise CliError("--config", str(e)) from None


def starts_local_ray(address: str | None) -> bool:
    """Whether `serve` starts its own Ray here (launch.start's rule) rather than joining a cluster."""
    return (address or os.environ.get("RAY_ADDRESS") or "local") == "local"


def run(args) -> int:
    cfg = config_from_args(args)
    from lessserve.cli import preflight

    for line in preflight.check(cfg, local=starts_local_ray(args.address)):  # before Ray: fails in seconds
        print(line, file=sys.stderr, flush=True)
    from lessserve.cluster import launch

    stop = threading.Event()

    def on_signal(signum, _frame):
        if not stop.is_set():
            print(f"lessserve: {signal.Signals(signum).name}: draining (up to {cfg.drain_timeout_s:g} s), "
                  "then exiting", flush=True)
        stop.set()

    def handle_signals():  # ray.init installs its own SIGTERM handler (a stack dump, then abort): replace it
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, on_signal)

    handle_signals()
    launch.start(cfg, address=args.address, after_init=handle_signals)
    handle_signals()
    if not stop.is_set():
        print(f"lessserve: serving {cfg.model_name} ({cfg.engine.policy}, budget {cfg.engine.budget}) on "
              f"http://{cfg.host}:{cfg.port}/v1  (Ctrl-C to stop)", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        t0 = time.monotonic()
        print("lessserve: draining workers and shutting down ...", flush=True)
        launch.stop()
        print(f"lessserve: stopped in {time.monotonic() - t0:.1f} s", flush=True)
    return 0
