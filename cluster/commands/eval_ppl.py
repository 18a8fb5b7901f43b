"""`lessserve eval ppl`: perplexity per policy and budget under continuous eviction."""

from __future__ import annotations

from lessserve.cluster.commands.common import (
    CliError,
    add_engine_flags,
    engine_config,
    existing_file,
    in_range,
    parse_ints,
    parse_policies,
)


def register(esub) -> None:
    p = esub.add_parser("ppl", help="perplexity over text windows")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--policies", default="full,h2o,lambda")
    p.add_argument("--budgets", default="64,128,256")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--tail-fraction", type=float, default=None,
                   help="use only the last fraction of the text (e.g. 0.1 for a held-out split)")
    p.add_argument("--json", default=None, help="write rows here")
    p.add_argument("--plot", default=None, help="PNG: perplexity vs budget per policy")
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    existing_file("--text", args.text)
    policies = parse_policies("--policies", args.policies)
    budgets = parse_ints("--budgets", args.budgets, lo=2, hi=65536)
    in_range("--context", args.context, 16, 65536)
    in_range("--windows", args.windows, 1, 1000)
    if args.tail_fraction is not None and not 0 < args.tail_fraction <= 1:
        raise CliError("--tail-fraction", "must be in (0, 1]")
    from lessserve.workers.eval_common import EngineFactory
    from lessserve.workers.eval_ppl import eval_ppl, read_text
    from lessserve.workers.plots import line_plot
    from lessserve.workers.report import markdown_table, write_json

    try:
        text = read_text(args.text, tail_fraction=args.tail_fraction)
    except (OSError, UnicodeError) as e:
        raise CliError("--text", str(e)) from None
    factory = EngineFactory(engine_config(args, max_context=args.context, max_slots=1))
    try:
        rows = eval_ppl(factory, text, policies, budgets, args.context, args.windows)
    except ValueError as e:
        raise CliError("--text", str(e)) from None
    print(markdown_table(rows))
    write_json(args.json, rows)
    if args.plot:
        line_plot(rows, "budget", "ppl", "policy", args.plot, f"Perplexity vs budget ({args.text.split('/')[-1]})",
                  logx=True)
    return 0
