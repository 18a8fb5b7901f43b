"""`lessserve bench {decode,offload,serve,kernels}`: benchmark programs (a table, JSON with --json)."""

from __future__ import annotations

from lessserve.cli.flags import (
    CliError,
    add_engine_flags,
    default_of,
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
                _register_forks, _register_interference, _register_chunking, _register_capacity,
                _register_structured, _register_recall):
        reg(bsub)


def _register_decode(bsub) -> None:
    p = bsub.add_parser("decode", help="batched decode vs transformers full cache")
    p.add_argument("--batches", default="1,4,8", help="numbers of sessions decoded together")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: tokens/s by batch")
    p.add_argument("--compile", action="store_true",
                   help="also time the per-layer compressed step through torch.compile (one more row per batch)")
    p.add_argument("--equal-bytes", default="", metavar="BITS",
                   help="also time the policy with these --kv-bits (e.g. 8,4) at the largest budget whose slot fits "
                        "the same bytes as the engine's, in turn with it (one more row per batch and bits)")
    add_engine_flags(p)
    p.set_defaults(func=cmd_decode)


def cmd_decode(args) -> int:
    batches = parse_ints("--batches", args.batches, lo=1, hi=1024)
    in_range("--context", args.context, 64, 32768)
    in_range("--steps", args.steps, 1, 10000)
    in_range("--threads", args.threads, 0, 1024)
    from lessserve.workers.config import KV_BITS

    bits = parse_names("--equal-bytes", args.equal_bytes, KV_BITS) if args.equal_bytes.strip() else []
    cfg = engine_config(args)
    if bits and "recall" in cfg.policy:
        raise CliError("--equal-bytes", "+recall keeps native slots")
    from lessserve.bench.decode import run_decode

    return _emit(run_decode(cfg, batches, args.context, args.steps, args.threads, args.compile, bits), args)


def _register_offload(bsub) -> None:
    p = bsub.add_parser("offload", help="session restore (host, Redis) vs a fair one-forward recompute")
    p.add_argument("--histories", default="512,1024,2048,4096,8192", help="tokens of conversation history")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per path (recompute: 1)")
    p.add_argument("--redis-url", default=None, help="Redis to use (default: start a private one)")
    p.add_argument("--quantize", action="store_true", help="offload k/v as int8")
    p.add_argument("--text", default=None, help="text file the history is cut from (default: synthetic)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: next-turn TTFT by path and history")
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
    p = bsub.add_parser("serve", help="multi-turn chat load: sessions vs recompute-per-turn vs a paged full-KV "
                        "cache (vLLM-style blocks, LRU) at equal and at the baselines' KV bytes")
    p.add_argument("--users", type=int, default=6,
                   help="conversations (more than --session-slots: the host tier holds the rest)")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--rate", type=float, default=1.0, help="user arrivals per second (Poisson)")
    p.add_argument("--slots", type=int, default=2,
                   help="device slots (concurrent turns) of the full-policy slot configurations, each --max-context "
                   "long (recompute, full_sessions); paged_large's pool gets their bytes")
    p.add_argument("--session-slots", type=int, default=4,
                   help="device slots of the sessions configuration (its KV memory, device + host, must not "
                   "exceed the full-policy slots'); paged's pool gets the bytes of these device slots")
    p.add_argument("--first-words", type=int, default=1000, help="words of each conversation's first message")
    p.add_argument("--words", type=float, default=250, help="median words of later messages (log-normal)")
    p.add_argument("--short-tokens", type=int, default=16, help="tokens of a short reply")
    p.add_argument("--long-tokens", type=int, default=64, help="tokens of a long reply (30%% of turns)")
    p.add_argument("--policy", default="h2o+less", help="policy of the sessions configuration")
    p.add_argument("--budget", type=int, default=128)
    from lessserve.workers.config import KV_BITS, EngineConfig

    p.add_argument("--kv-bits", default="native", choices=KV_BITS,
                   help="slot format of the sessions configuration (docs/quality/equal_bytes.md)")

    p.add_argument("--chunk", type=int, default=default_of(EngineConfig, "prefill_chunk"),
                   help="prefill chunk of the sessions configuration (default: the engine's, %(default)s)")
    p.add_argument("--max-context", type=int, default=8192, help="full policy's slot length (recompute, full_sessions) "
                   "and prefill chunk of the full-KV configurations (at most 8192)")
    p.add_argument("--time-limit", type=float, default=200, help="seconds per configuration, at most")
    p.add_argument("--configs", default="sessions,recompute,paged,paged_large",
                   help="configurations to run, of sessions, recompute, paged, paged_large, full_sessions, paged_fp8, "
                   "paged_large_fp8 (sessions always; full_sessions: the fixed-slot full-KV cache the paged ones "
                   "supersede; the _fp8 ones: the paged pools with fp8 K/V, as vLLM's --kv-cache-dtype fp8)")
    p.add_argument("--compile", action="store_true",
                   help="the sessions configuration's engine with its compile switch on (docs/bench_decode.md)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--model", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: turns/s and p99 TTFT per configuration")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    for flag, v, lo, hi in (("--users", args.users, 1, 256), ("--turns", args.turns, 1, 64),
                            ("--slots", args.slots, 1, 256), ("--session-slots", args.session_slots, 1, 4096),
                            ("--first-words", args.first_words, 1, 20000),
                            ("--short-tokens", args.short_tokens, 1, 1024),
                            ("--long-tokens", args.long_tokens, 1, 1024),
                            ("--chunk", args.chunk, 1, 8192), ("--max-context", args.max_context, 64, 32768),
                            ("--time-limit", args.time_limit, 1, 3600), ("--threads", args.threads, 0, 1024)):
        in_range(flag, v, lo, hi)
    if not 0 < args.rate <= 100:
        raise CliError("--rate", "must be in (0, 100]")
    if not 1 <= args.words <= 2000:
        raise CliError("--words", "must be in [1, 2000]")
    from lessserve.bench.serve import Workload, run_serve

    load = Workload(args.users, args.turns, args.rate, args.first_words, args.words, args.short_tokens,
                    args.long_tokens, seed=args.seed)
    return _emit(run_serve(args.policy, args.budget, load, args.slots, args.time_limit, args.chunk,
                           args.max_context, args.threads, args.model, args.session_slots,
                           tuple(c.strip() for c in args.configs.split(",") if c.strip()), args.compile,
                           args.kv_bits), args)


def _register_kernels(bsub) -> None:
    from lessserve.bench.kernels import KERNELS, MODELS

    p = bsub.add_parser("kernels", help="Triton kernels vs torch reference vs full-cache SDPA")
    p.add_argument("--kernels", default=None, help=f"subset of {','.join(KERNELS)} (default: all; --plan: those "
                   "the roofline models)")
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
    kernels = parse_names("--kernels", args.kernels or ",".join(KERNELS), KERNELS)
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

    kernels = parse_names("--kernels", args.kernels or ",".join(KERNELS), KERNELS)
    models = parse_names("--models", args.models or ",".join(SHAPES), SHAPES)
    batches = parse_ints("--batches", args.batches or "1,8,32,128", lo=1, hi=4096)
    budgets = parse_ints("--budgets", args.budgets or "128,512,2048", lo=16, hi=65536)
    gpu = parse_names("--gpu", args.gpu, GPUS)[0]
    if args.bandwidth is not None:
        in_range("--bandwidth", args.bandwidth, 1, 100_000)
    bw = args.bandwidth * 1e9 if args.bandwidth else None
    return _emit(run_plan(kernels, models, batches, budgets, gpu, bw), args)


def _register_gpu(bsub) -> None:
    from lessserve.bench.gpu_run import BUDGET_S, ON_REQUEST, STAGES

    p = bsub.add_parser("gpu", help="the prepared GPU run: native GPU tests + kernels / decode / serve benches "
                        "(without a GPU: a dry run of the CPU-side stages)")
    p.add_argument("--out", default="gpu-results", help="folder for summary.md / summary.json / stage JSON")
    p.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}, in order, or "
                   f"besides them {','.join(ON_REQUEST)}")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for the whole run")
    p.set_defaults(func=cmd_gpu)


def cmd_gpu(args) -> int:
    from pathlib import Path

    from lessserve.bench.gpu_run import ON_REQUEST, STAGES, run_gpu

    stages = parse_names("--stages", args.stages, STAGES + ON_REQUEST)
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


def _register_structured(bsub) -> None:
    p = bsub.add_parser("structured", help="constrained decoding's cost per decode step (free vs regex vs JSON schema)")
    p.add_argument("--batches", default="1,8", help="sessions decoded together")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: step time by batch and mode")
    add_engine_flags(p)
    p.set_defaults(func=cmd_structured)


def cmd_structured(args) -> int:
    batches = parse_ints("--batches", args.batches, lo=1, hi=256)
    in_range("--tokens", args.tokens, 1, 4096)
    in_range("--repeats", args.repeats, 1, 100)
    from lessserve.bench.structured import run_structured

    return _emit(run_structured(engine_config(args), batches, args.tokens, args.repeats), args)


def _register_recall(bsub) -> None:
    p = bsub.add_parser("recall", help="+recall's costs: host bytes per history token, a turn's TTFT with and "
                        "without recall by history length, perplexity against the base policy")
    p.add_argument("--lengths", default="1024,4096,7680", help="history lengths in tokens (the history and "
                   "the longest timed turn must fit the model's context)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ttft-prefix", default="0,256", help="timed turns: tokens of text before the question in "
                   "each (0: the question alone)")
    p.add_argument("--context", type=int, default=2048, help="tokens per perplexity window")
    p.add_argument("--windows", type=int, default=1, help="perplexity windows per test text")
    p.add_argument("--turn", type=int, default=256, help="tokens per turn when a window is read as a conversation")
    p.add_argument("--ppl-policies", default="h2o,lambda+less", help="base policies whose +recall perplexity is "
                   "measured ('' = none)")
    p.add_argument("--part", default="test", choices=["dev", "test"], help="which part of the texts the perplexity "
                   "windows come from (dev: to choose; test: to report)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: TTFT by history length, perplexity by text")
    add_engine_flags(p)
    p.set_defaults(func=cmd_recall)


def cmd_recall(args) -> int:
    lengths = parse_ints("--lengths", args.lengths, lo=64, hi=1 << 20)
    in_range("--repeats", args.repeats, 1, 100)
    in_range("--context", args.context, 64, 1 << 20)
    in_range("--windows", args.windows, 1, 1000)
    in_range("--turn", args.turn, 8, 1 << 20)
    prefixes = parse_ints("--ttft-prefix", args.ttft_prefix, lo=0, hi=4096)
    from lessserve.workers.compression import Policy

    bases = [p.strip() for p in args.ppl_policies.split(",") if p.strip()]
    for b in bases:
        if b not in ("h2o", "lambda", "h2o+less", "lambda+less"):
            raise CliError("--ppl-policies", f"{b!r} is not a base policy (h2o, lambda, h2o+less, lambda+less)")
    cfg = engine_config(args)
    base = Policy.parse(cfg.policy)
    if base.base == "full" or base.plus or base.recall:
        raise CliError("--policy", f"{cfg.policy!r}: give the base policy (h2o, lambda, optionally +less); "
                       "its +recall is measured against it")
    from lessserve.bench.recall import bench_recall
    from lessserve.lab.engines import EngineFactory

    longest = max(max(lengths) + max(prefixes), args.context)
    factory = EngineFactory(cfg.model_copy(update={"max_context": longest + 512}))
    return _emit(bench_recall(factory, cfg.policy, cfg.budget, tuple(lengths), args.repeats, args.context,
                              args.windows, args.turn, tuple(bases), args.part, tuple(prefixes)), args)


def _register_interference(bsub) -> None:
    p = bsub.add_parser("interference", help="short sessions' ITL while a long prompt, rebuild or shared prompt "
                                              "prefills (chunked) vs the one-go stall")
    p.add_argument("--long-tokens", type=int, default=2048, help="tokens of the long work")
    p.add_argument("--shorts", type=int, default=4, help="short sessions decoding meanwhile")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens each short session decodes")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: ITL p99 per case beside the one-go stall")
    add_engine_flags(p)
    p.set_defaults(func=cmd_interference)


def cmd_interference(args) -> int:
    in_range("--long-tokens", args.long_tokens, 64, 32768)
    in_range("--shorts", args.shorts, 1, 64)
    in_range("--new-tokens", args.new_tokens, 4, 4096)
    in_range("--repeats", args.repeats, 1, 20)
    from lessserve.bench.interference import run_interference

    return _emit(run_interference(engine_config(args), args.long_tokens, args.shorts, args.new_tokens,
                                  args.repeats), args)


def _register_chunking(bsub) -> None:
    p = bsub.add_parser("chunking", help="perplexity and prefill time by prefill chunk (large chunks vs 32)")
    p.add_argument("--policies", default="h2o,lambda,h2o+less", help="policies compared")
    p.add_argument("--chunks", default="32,256,512", help="prefill chunks; the smallest is the reference")
    p.add_argument("--text", default="../shared/data/tinyshakespeare.txt", help="text file the windows are cut from")
    p.add_argument("--part", choices=["train", "dev", "test", "all"], default="test",
                   help="the part of the text under the project's split rule (lab/corpus.py) the windows are cut from")
    p.add_argument("--context", type=int, default=2048, help="tokens per window")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--decode-tail", type=int, default=128,
                   help="last tokens of each window decoded one at a time after the chunked prefill: the "
                   "perplexity through the cache a chunk size leaves (0: off)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    add_engine_flags(p)
    p.set_defaults(func=cmd_chunking)


def cmd_chunking(args) -> int:
    chunks = parse_ints("--chunks", args.chunks, lo=1, hi=8192)
    in_range("--context", args.context, 64, 32768)
    in_range("--windows", args.windows, 1, 100)
    in_range("--decode-tail", args.decode_tail, 0, args.context // 2)
    in_range("--threads", args.threads, 0, 1024)
    path = existing_file("--text", args.text)
    from lessserve.bench.chunking import run_chunking

    cfg = engine_config(args)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    return _emit(run_chunking(cfg, policies, cfg.budget, chunks, path, args.context, args.windows, args.threads,
                              part=args.part, tail=args.decode_tail), args)


def _register_capacity(bsub) -> None:
    p = bsub.add_parser("capacity", help="capacity on paper: sessions per GPU, Redis memory and egress, vs full KV")
    p.add_argument("--models", default="llama3-8b,llama2-7b")
    p.add_argument("--budgets", default="64,128,256")
    p.add_argument("--rank", type=int, default=8, help="LESS rank")
    p.add_argument("--contexts", default="2048,8192", help="mean context of the full-KV rows")
    p.add_argument("--conversations", type=int, default=1_000_000)
    p.add_argument("--resident-share", type=float, default=0.05, help="share of conversations kept on GPUs")
    p.add_argument("--turn-interval", type=float, default=60.0, help="seconds between a conversation's turns")
    p.add_argument("--workspace-share", type=float, default=0.1, help="HBM share kept for activations")
    p.add_argument("--redis-node-gb", type=float, default=200, help="usable memory of one Redis node")
    p.add_argument("--redis-node-gbps", type=float, default=2.5, help="GB/s one Redis node serves (25 GbE)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_capacity)


def cmd_capacity(args) -> int:
    from lessserve.bench.capacity import SHAPES, run_capacity

    models = parse_names("--models", args.models, SHAPES)
    budgets = parse_ints("--budgets", args.budgets, lo=2, hi=65536)
    contexts = parse_ints("--contexts", args.contexts, lo=1, hi=1 << 20)
    in_range("--rank", args.rank, 0, 256)
    in_range("--conversations", args.conversations, 1, 10**10)
    for flag, v in (("--resident-share", args.resident_share), ("--workspace-share", args.workspace_share)):
        if not 0 <= v < 1:
            raise CliError(flag, "must be in [0, 1)")
    for flag, v in (("--turn-interval", args.turn_interval), ("--redis-node-gb", args.redis_node_gb),
                    ("--redis-node-gbps", args.redis_node_gbps)):
        if not v > 0:
            raise CliError(flag, "must be > 0")
    return _emit(run_capacity(models, budgets, args.rank, contexts, args.conversations, args.resident_share,
                              args.turn_interval, args.workspace_share, args.redis_node_gb * 1e9,
                              args.redis_node_gbps * 1e9), args)


def _emit(result, args) -> int:
    """Print the result's table and write its JSON (and PNG, when the command has --plot)."""
    result.show()
    result.write(args.json, getattr(args, "plot", None))
    return 0
