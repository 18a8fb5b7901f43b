"""`lessserve eval passkey`: pass-key retrieval accuracy per policy, budget and length."""

from __future__ import annotations

from lessserve.cluster.commands.common import add_engine_flags, engine_config, in_range, parse_ints, parse_policies


def register(esub) -> None:
    p = esub.add_parser("passkey", help="pass-key retrieval accuracy")
    p.add_argument("--policies", default="full,h2o,lambda")
    p.add_argument("--budgets", default="64,128,256")
    p.add_argument("--lengths", default="512,1024,2000")
    p.add_argument("--trials", type=int, default=2, help="trials per depth (depths 10/50/90%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: accuracy vs length per policy")
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    policies = parse_policies("--policies", args.policies)
    budgets = parse_ints("--budgets", args.budgets, lo=2, hi=65536)
    lengths = parse_ints("--lengths", args.lengths, lo=64, hi=65536)
    in_range("--trials", args.trials, 1, 100)
    from lessserve.workers.eval_common import EngineFactory
    from lessserve.workers.eval_passkey import eval_passkey
    from lessserve.workers.plots import line_plot
    from lessserve.workers.report import markdown_table, write_json

    factory = EngineFactory(engine_config(args, max_context=max(lengths) + 64, max_slots=1))
    rows = eval_passkey(factory, policies, budgets, lengths, args.trials, args.seed)
    print(markdown_table(rows))
    write_json(args.json, rows)
    if args.plot:
        for r in rows:
            r["series"] = f"{r['policy']}@{r['budget']}"
        line_plot(rows, "length", "accuracy", "series", args.plot, "Passkey accuracy vs length")
    return 0
