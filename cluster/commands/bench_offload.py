"""`lessserve bench offload`: next-turn TTFT with the session cache on device / host / Redis /
recomputed, bytes per tier, and restore bandwidth against raw redis-py."""

from __future__ import annotations

from lessserve.cluster.commands.common import CliError, add_engine_flags, engine_config, existing_file, parse_ints


def register(bsub) -> None:
    p = bsub.add_parser("offload", help="session restore (host, Redis) vs recomputation")
    p.add_argument("--histories", default="512,1024,2048", help="tokens of conversation history")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per path (recompute: 1)")
    p.add_argument("--redis-url", default=None, help="Redis to use (default: start a private one)")
    p.add_argument("--quantize", action="store_true", help="offload k/v as int8")
    p.add_argument("--text", default=None, help="text file the history is cut from (default: synthetic)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--json", default=None)
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    histories = parse_ints("--histories", args.histories, lo=16, hi=32768)
    if not 1 <= args.repeats <= 100:
        raise CliError("--repeats", "must be in [1, 100]")
    if args.threads < 0:
        raise CliError("--threads", "must be >= 0")
    text = existing_file("--text", args.text).read_text() if args.text else None
    import torch

    from lessserve.cache_store.local_redis import LocalRedis
    from lessserve.workers.bench_offload import bench_history
    from lessserve.workers.engine import Engine
    from lessserve.workers.report import markdown_table, progress, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = engine_config(args, max_slots=2, max_context=max(histories) + 256)
    engine = Engine(cfg)
    server = None
    url = args.redis_url
    if url is None:
        server = LocalRedis(persist=False).start()
        url = server.url
        progress(f"private redis-server on {url}")
    try:
        rows, summaries = [], []
        for n in histories:
            r, s = bench_history(engine, url, n, args.repeats, args.quantize, text)
            rows += r
            summaries.append(s)
    finally:
        if server:
            server.stop()
    print(f"device: {engine.device}, model {engine.model_id}, policy {engine.policy.name}, budget "
          f"{engine.cfg.budget}, torch threads {torch.get_num_threads()}, quantize {args.quantize}")
    print(markdown_table(rows))
    print()
    print(markdown_table(summaries))
    write_json(args.json, rows)
    return 0
