"""`lessserve bench decode`: batched decode tokens/s and cache bytes vs transformers full cache."""

from __future__ import annotations

from lessserve.cluster.commands.common import add_engine_flags, engine_config, in_range, parse_ints


def register(bsub) -> None:
    p = bsub.add_parser("decode", help="batched decode vs transformers full cache")
    p.add_argument("--batches", default="1,4", help="numbers of sessions decoded together")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps")
    p.add_argument("--json", default=None)
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    batches = parse_ints("--batches", args.batches, lo=1, hi=1024)
    in_range("--context", args.context, 64, 32768)
    in_range("--steps", args.steps, 1, 10000)
    from lessserve.workers.bench_decode import bench_decode
    from lessserve.workers.eval_common import EngineFactory
    from lessserve.workers.report import markdown_table, write_json

    factory = EngineFactory(engine_config(args, max_context=args.context + args.steps + 8, prefill_chunk=256))
    rows = bench_decode(factory, args.policy, args.budget, batches, args.context, args.steps)
    dev = factory.device
    print(f"device: {dev} (CPU figures are ratios only; absolute times need a GPU)" if dev.type == "cpu"
          else f"device: {dev}")
    print(markdown_table(rows))
    write_json(args.json, rows)
    return 0
