"""`lessserve bench {decode,offload,serve,kernels}`: benchmark programs (a table, JSON with --json)."""

from __future__ import annotations

from lessserve.cli.flags import (
    CliError,
    add_engine_flags,
    engine_config,
    existing_file,
    in_range,
    parse_ints,
    parse_names,
)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (table + JSON)")
    bsub = p.add_subparsers(dest="bench", required=True)
    for reg in (_register_decode, _register_kernels, _register_offload, _register_serve, _register_gpu, _register_soak,
                _register_forks):
        reg(bsub)


def _register_decode(bsub) -> None:
    p = bsub.add_parser("decode", help="batched decode vs transformers full cache")
    p.add_argument("--batches", default="1,4", help="numbers of sessions decoded together")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps")
    p.add_argument("--json", default=None)
    add_engine_flags(p)
    p.set_defaults(func=cmd_decode)


def cmd_decode(args) -> int:
    batches = parse_ints("--batches", args.batches, lo=1, hi=1024)
    in_range("--context", args.context, 64, 32768)
    in_range("--steps", args.steps, 1, 10000)
    from lessserve.bench.decode import run_decode

    return _emit(run_decode(engine_config(args), batches, args.context, args.steps), args)


def _register_offload(bsub) -> None:
    p = bsub.add_parser("offload", help="session restore (host, Redis) vs recomputation")
    p.add_argument("--histories", default="512,1024,2048", help="tokens of conversation history")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per path (recompute: 1)")
    p.add_argument("--redis-url", default=None, help="Redis to use (default: start a private one)")
    p.add_argument("--quantize", action="store_true", help="offload k/v as int8")
    p.add_argument("--text", default=None, help="text file the history is cut from (default: synthetic)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--json", default=None)
    add_engine_flags(p)
    p.set_defaults(func=cmd_offload)


def cmd_offload(args) -> int:
    histories = parse_ints("--histories", args.histories, lo=16, hi=32768)
    in_range("--repeats", args.repeats, 1, 100)
    in_range("--threads", args.threads, 0, 1024)
    text = existing_file("--text", args.text).read_text() if args.text else None
    from lessserve.bench.offload import run_offload

    return _emit(run_offload(engine_config(args), histories, args.repeats, args.quantize, text, args.redis_url,
                             args.threads), args)


def _register_serve(bsub) -> None:
    p = bsub.add_parser("serve", help="multi-turn chat load: session caches vs recompute")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.5, help="user arrivals per second (Poisson)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--policy", default="h2o+less", help="policy of configuration (a)")
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--time-limit", type=float, default=600, help="seconds per configuration, at most")
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    for flag, v, lo, hi in (("--users", args.users, 1, 256), ("--turns", args.turns, 1, 64),
                            ("--max-tokens", args.max_tokens, 1, 1024), ("--port", args.port, 1024, 65535),
                            ("--time-limit", args.time_limit, 1, 3600)):
        in_range(flag, v, lo, hi)
    if not 0 < args.rate <= 100:
        raise CliError("--rate", "must be in (0, 100]")
    from lessserve.bench.serve import run_serve

    return _emit(run_serve(args.policy, args.budget, args.users, args.turns, args.rate, args.max_tokens,
                           args.time_limit, args.port, args.seed), args)


def _register_kernels(bsub) -> None:
    from lessserve.bench.kernels import KERNELS, MODELS

    p = bsub.add_parser("kernels", help="Triton kernels vs torch reference vs full-cache SDPA")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"subset of {','.join(KERNELS)}")
    p.add_argument("--models", default=None, help=f"subset of {','.join(MODELS)} (default: all on GPU)")
    p.add_argument("--batches", default=None, help="slots per call (default 1,8,32,128 on GPU; 1,4 on CPU)")
    p.add_argument("--budgets", default=None, help="cached tokens per head (default 128,512,2048; 128 on CPU)")
    p.add_argument("--context", type=int, default=4096, help="tokens the session represents (SDPA baseline)")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--plan", action="store_true",
                   help="print the static roofline (bytes per call, expected time at --gpu's bandwidth); no timing")
    p.add_argument("--gpu", default="h200", help="plan: datasheet bandwidth and SMs of h200 | h100 | a100")
    p.add_argument("--bandwidth", type=float, default=None, help="plan: GB/s to assume instead of the datasheet's")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_kernels)


def cmd_kernels(args) -> int:
    import torch

    from lessserve.bench.kernels import KERNELS, MODELS, run_kernels

    if args.plan:
        return _plan(args)
    gpu = torch.cuda.is_available()
    kernels = parse_names("--kernels", args.kernels, KERNELS)
    models = parse_names("--models", args.models or (",".join(MODELS) if gpu else "smollm2-135m"), MODELS)
    batches = parse_ints("--batches", args.batches or ("1,8,32,128" if gpu else "1,4"), lo=1, hi=4096)
    budgets = parse_ints("--budgets", args.budgets or ("128,512,2048" if gpu else "128"), lo=16, hi=65536)
    in_range("--context", args.context, 16, 1 << 20)
    in_range("--iters", args.iters, 1, 100_000)
    in_range("--warmup", args.warmup, 0, 100_000)
    return _emit(run_kernels(kernels, models, batches, budgets, args.context, args.dtype, args.warmup, args.iters),
                 args)


def _plan(args) -> int:
    """`bench kernels --plan`: 7B / 8B / default shapes, batch 1-128, budgets 128-2048 unless narrowed."""
    from lessserve.bench.roofline import GPUS, KERNELS, SHAPES, run_plan

    kernels = parse_names("--kernels", args.kernels, KERNELS)
    models = parse_names("--models", args.models or ",".join(SHAPES), SHAPES)
    batches = parse_ints("--batches", args.batches or "1,8,32,128", lo=1, hi=4096)
    budgets = parse_ints("--budgets", args.budgets or "128,512,2048", lo=16, hi=65536)
    gpu = parse_names("--gpu", args.gpu, GPUS)[0]
    if args.bandwidth is not None:
        in_range("--bandwidth", args.bandwidth, 1, 100_000)
    bw = args.bandwidth * 1e9 if args.bandwidth else None
    return _emit(run_plan(kernels, models, batches, budgets, gpu, bw), args)


def _register_gpu(bsub) -> None:
    from lessserve.bench.gpu_run import BUDGET_S, STAGES

    p = bsub.add_parser("gpu", help="the prepared GPU run: native GPU tests + kernels / decode / serve benches "
                        "(without a GPU: a dry run of the CPU-side stages)")
    p.add_argument("--out", default="gpu-results", help="folder for summary.md / summary.json / stage JSON")
    p.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}, in order")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for the whole run")
    p.set_defaults(func=cmd_gpu)


def cmd_gpu(args) -> int:
    from pathlib import Path

    from lessserve.bench.gpu_run import STAGES, run_gpu

    stages = parse_names("--stages", args.stages, STAGES)
    in_range("--budget-s", args.budget_s, 10, 3600)
    return run_gpu(Path(args.out), stages, args.budget_s)


def _register_soak(bsub) -> None:
    p = bsub.add_parser("soak", help="bounded mixed multi-turn load for a set time, Redis faults optional; "
                                     "5xx/503 counts, TTFT, RSS of router and workers over time")
    p.add_argument("--duration", type=float, default=300, help="seconds of load")
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--turns", type=int, default=4, help="turns per conversation (then a new one)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-turns", type=int, default=100_000, help="stop after this many turns in all")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--faults", action="store_true", help="kill Redis periodically (back from AOF, then empty)")
    p.add_argument("--fault-every", type=float, default=60, help="seconds between Redis kills")
    p.add_argument("--sample-every", type=float, default=5, help="seconds between RSS samples")
    p.add_argument("--warmup", type=float, default=60, help="seconds before the RSS baseline")
    p.add_argument("--port", type=int, default=8322)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: RSS over time")
    p.set_defaults(func=cmd_soak)


def cmd_soak(args) -> int:
    for flag, v, lo, hi in (("--duration", args.duration, 10, 86400), ("--users", args.users, 1, 256),
                            ("--turns", args.turns, 1, 64), ("--max-tokens", args.max_tokens, 1, 1024),
                            ("--max-turns", args.max_turns, 1, 10**7), ("--workers", args.workers, 1, 64),
                            ("--fault-every", args.fault_every, 5, 86400),
                            ("--sample-every", args.sample_every, 0.5, 600),
                            ("--warmup", args.warmup, 0, 86400), ("--port", args.port, 1024, 65535)):
        in_range(flag, v, lo, hi)
    from lessserve.bench.soak import run_soak

    return _emit(run_soak(args.duration, args.users, args.turns, args.max_tokens, args.max_turns, args.port,
                          args.seed, args.faults, args.fault_every, args.sample_every, args.warmup, args.workers),
                 args)


def _register_forks(bsub) -> None:
    p = bsub.add_parser("forks", help="fork cost (one slot copy) vs a fresh prefill; shared-prefix TTFT vs cold")
    p.add_argument("--histories", default="512,1024,2048", help="tokens of history forked")
    p.add_argument("--prompt-tokens", type=int, default=1000, help="tokens of the shared system prompt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    add_engine_flags(p)
    p.set_defaults(func=cmd_forks)


def cmd_forks(args) -> int:
    histories = parse_ints("--histories", args.histories, lo=16, hi=32768)
    in_range("--prompt-tokens", args.prompt_tokens, 70, 32768)
    in_range("--repeats", args.repeats, 1, 100)
    from lessserve.bench.forks import run_forks

    return _emit(run_forks(engine_config(args), histories, args.prompt_tokens, args.repeats), args)


def _emit(result, args) -> int:
    """Print the result's table and write its JSON (and PNG, when the command has --plot)."""
    result.show()
    result.write(args.json, getattr(args, "plot", None))
    return 0
