"""`lessserve generate`: one prompt through a compressed session, streamed to stdout."""

from __future__ import annotations

import sys

from lessserve.cli.flags import CliError, add_engine_flags, engine_config


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="plain completion (no chat template)")
    p.add_argument("--stats", action="store_true", help="print cache statistics to stderr")
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.prompt.strip():
        raise CliError("--prompt", "must not be empty")
    if not 1 <= args.max_new_tokens <= 100_000:
        raise CliError("--max-new-tokens", "must be in [1, 100000]")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise CliError("--temperature" if args.temperature < 0 else "--top-p", "out of range")
    from lessserve.workers.chat_session import encode, render
    from lessserve.workers.engine import Engine
    from lessserve.workers.reply import Reply
    from lessserve.workers.scheduler import BatchScheduler, SamplingParams

    engine = Engine(engine_config(args, max_slots=1))
    tok = engine.tokenizer
    text = args.prompt if args.raw else render(tok, [{"role": "user", "content": args.prompt}])
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop_ids=engine.stop_ids)
    with BatchScheduler(engine) as scheduler:  # the server's generation loop, in process
        slot = scheduler.call(engine.alloc)
        for piece in Reply(tok, engine.stop_ids).pieces(scheduler.stream(slot, encode(tok, text), params)):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        s = engine.stats(slot)
        print(f"[{engine.policy.name} budget={engine.spec.budget}] cached_tokens={s['cached_tokens']} "
              f"tokens_seen={s['tokens_seen']} cache_bytes={s['cache_bytes']}", file=sys.stderr)
    return 0
