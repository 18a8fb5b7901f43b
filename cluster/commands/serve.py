"""`lessserve serve`: the serving cluster (embedded default: local Ray, one worker, CPU if no GPU)."""

from __future__ import annotations

import signal
import threading

from pydantic import ValidationError

from lessserve.cluster.commands.common import CliError, existing_file


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible REST API")
    p.add_argument("--config", default=None, help="YAML: lessserve config or a Serve config file")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--redis-url", default=None, help="shared Redis tier and session directory")
    p.add_argument("--workers", type=int, default=None, help="fixed number of workers")
    p.add_argument("--max-workers", type=int, default=None, help="autoscale up to this many workers")
    p.add_argument("--api-keys-file", default=None, help="file with one API key per line")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    p.add_argument("--model", default=None)
    p.add_argument("--policy", default=None)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--kernels", default=None, choices=["auto", "torch", "triton"])
    p.add_argument("--max-slots", type=int, default=None, help="session slots per worker")
    p.set_defaults(func=run)


def config_from_args(args):
    from lessserve.cluster.config import load_config

    if args.config:
        existing_file("--config", args.config)
    if args.api_keys_file:
        existing_file("--api-keys-file", args.api_keys_file)
    over = {"host": args.host, "port": args.port, "store.redis_url": args.redis_url,
            "api_keys_file": args.api_keys_file, "engine.model": args.model, "engine.policy": args.policy,
            "engine.budget": args.budget, "engine.kernels": args.kernels, "engine.max_slots": args.max_slots}
    if args.workers is not None:
        over.update({"workers.min_workers": args.workers, "workers.max_workers": args.workers})
    if args.max_workers is not None:
        over["workers.max_workers"] = args.max_workers
    try:
        return load_config(args.config, over)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        flag = {"min_workers": "--workers", "max_workers": "--max-workers", "redis_url": "--redis-url",
                "max_slots": "--max-slots"}.get(loc[-1], "--" + loc[-1].replace("_", "-")) if loc else "--config"
        raise CliError(flag, err["msg"]) from None
    except (OSError, ValueError) as e:
        raise CliError("--config", str(e)) from None


def run(args) -> int:
    cfg = config_from_args(args)
    from lessserve.cluster import launch

    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    launch.start(cfg, address=args.address)
    print(f"lessserve: serving {cfg.model_name} ({cfg.engine.policy}, budget {cfg.engine.budget}) on "
          f"http://{cfg.host}:{cfg.port}/v1  (Ctrl-C to stop)", flush=True)
    try:
        stop.wait()
    finally:
        print("lessserve: draining workers and shutting down ...", flush=True)
        launch.stop()
    return 0
