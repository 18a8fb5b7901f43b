"""`lessserve eval report`: regenerate the quality report (ppl on held-out Brown and
tinyshakespeare, passkey, gap closed) into one folder."""

from __future__ import annotations

from lessserve.cluster.commands.common import (
    add_engine_flags,
    engine_config,
    existing_file,
    in_range,
    parse_ints,
    parse_policies,
)
from lessserve.workers.eval_report import POLICIES


def register(esub) -> None:
    p = esub.add_parser("report", help="the whole quality report (JSON, markdown, plots)")
    p.add_argument("--brown", default="../shared/data/brown.txt", help="Brown text; its last 10%% is used")
    p.add_argument("--shakespeare", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--budgets", default="64,128,256")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--lengths", default="512,1024,2000")
    p.add_argument("--trials", type=int, default=2, help="passkey trials per depth")
    p.add_argument("--out", default="docs/quality", help="output folder")
    p.add_argument("--cache", default=None, help="row cache file (default: <cache dir>/eval-report/rows.jsonl)")
    p.add_argument("--fresh", action="store_true",
                   help="recompute every row (default: reuse rows of an earlier run whose inputs, engine "
                        "config and LESS kernels are unchanged)")
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    texts = {"brown_heldout": (str(existing_file("--brown", args.brown)), 0.1),
             "tinyshakespeare": (str(existing_file("--shakespeare", args.shakespeare)), None)}
    policies = parse_policies("--policies", args.policies)
    budgets = parse_ints("--budgets", args.budgets, lo=2, hi=65536)
    lengths = parse_ints("--lengths", args.lengths, lo=64, hi=65536)
    in_range("--context", args.context, 16, 65536)
    in_range("--windows", args.windows, 1, 1000)
    in_range("--trials", args.trials, 1, 100)
    from lessserve.workers.eval_cache import RowCache
    from lessserve.workers.eval_common import EngineFactory
    from lessserve.workers.eval_report import run_report
    from lessserve.workers.model_loader import cache_root

    factory = EngineFactory(engine_config(args, max_context=max(args.context, max(lengths)) + 64, max_slots=1))
    cache = RowCache(None if args.fresh else (args.cache or cache_root() / "eval-report" / "rows.jsonl"))
    rep = run_report(factory, texts, policies, budgets, args.context, args.windows, lengths, args.trials, args.out,
                     cache)
    for g in rep["gap_closed"]:
        print(f"{g['text']:16s} {g['policy']:6s} budget {g['budget']:4d}: +less closes {g['gap_closed']:.1%} "
              f"of the gap to full" + (f" (+ baseline: {g['plus_gap_closed']:.1%})" if g["plus_gap_closed"]
                                       is not None else ""))
    print(f"report written to {args.out}/report.md")
    return 0
