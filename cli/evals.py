"""`lessserve eval {ppl,passkey,recall,report,harness}`: quality under each policy and budget."""

from __future__ import annotations

from lessserve.cli.flags import (
    CliError,
    add_engine_flags,
    engine_config,
    existing_file,
    in_range,
    parse_ints,
    parse_names,
    parse_policies,
)


def register(sub) -> None:
    p = sub.add_parser("eval", help="quality evaluations (perplexity, passkey, the quality report)")
    esub = p.add_subparsers(dest="eval", required=True)
    for reg in (_register_ppl, _register_passkey, _register_recall, _register_report, _register_pareto,
                _register_harness):
        reg(esub)


def _register_ppl(esub) -> None:
    p = esub.add_parser("ppl", help="perplexity over text windows")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--policies", default="full,h2o,lambda")
    p.add_argument("--budgets", default="64,128,256")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--tail-fraction", type=float, default=None,
                   help="use only the last fraction of the text (e.g. 0.1 for a held-out split)")
    p.add_argument("--part", choices=["train", "dev", "test"], default=None,
                   help="use only this part of the text under the project's split rule (lab/corpus.py)")
    p.add_argument("--equal-bytes", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="run every policy (full left out) at the largest budget whose session slot fits N bytes in "
                   "the engine's --kv-bits and --dtype, instead of --budgets (no N: the slot of h2o at budget 128 "
                   "in the engine's dtype); rows report bytes, budget, kv_bits and perplexity")
    p.add_argument("--json", default=None, help="write rows here")
    p.add_argument("--plot", default=None, help="PNG: perplexity vs budget per policy")
    add_engine_flags(p)
    p.set_defaults(func=cmd_ppl)


def cmd_ppl(args) -> int:
    existing_file("--text", args.text)
    policies = parse_policies("--policies", args.policies)
    budgets = parse_ints("--budgets", args.budgets, lo=2, hi=65536)
    in_range("--context", args.context, 16, 65536)
    in_range("--windows", args.windows, 1, 1000)
    if args.equal_bytes is not None:
        in_range("--equal-bytes", args.equal_bytes, 0, 1 << 40)
    if args.tail_fraction is not None and not 0 < args.tail_fraction <= 1:
        raise CliError("--tail-fraction", "must be in (0, 1]")
    from lessserve.evals.ppl import eval_ppl, eval_ppl_equal_bytes, read_text
    from lessserve.lab.engines import EngineFactory
    from lessserve.lab.output import markdown_table, write_json
    from lessserve.lab.plots import line_plot

    if args.part and args.tail_fraction:
        raise CliError("--part", "give --part or --tail-fraction, not both")
    try:
        text = read_text(args.text, tail_fraction=args.tail_fraction)
    except (OSError, UnicodeError) as e:
        raise CliError("--text", str(e)) from None
    if args.part:
        from lessserve.lab.corpus import split_part

        text = split_part(text, args.part)
    factory = EngineFactory(eval_engine_config(args, max_context=args.context, max_slots=1))
    try:
        if args.equal_bytes is not None:
            rows = eval_ppl_equal_bytes(factory, text, policies, args.equal_bytes or None, args.context, args.windows)
        else:
            rows = eval_ppl(factory, text, policies, budgets, args.context, args.windows)
    except ValueError as e:
        raise CliError("--equal-bytes" if args.equal_bytes is not None and "bytes" in str(e) else "--text",
                       str(e)) from None
    print(markdown_table(rows))
    write_json(args.json, rows)
    if args.plot:
        line_plot(rows, "budget", "ppl", "policy", args.plot, f"Perplexity vs budget ({args.text.split('/')[-1]})",
                  logx=True)
    return 0


def _register_passkey(esub) -> None:
    p = esub.add_parser("passkey", help="pass-key retrieval accuracy")
    p.add_argument("--policies", default="full,h2o,lambda")
    p.add_argument("--budgets", default="64,128,256")
    p.add_argument("--lengths", default="512,1024,2000")
    p.add_argument("--trials", type=int, default=2, help="trials per depth (depths 10/50/90%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: accuracy vs length per policy")
    add_engine_flags(p)
    p.set_defaults(func=cmd_passkey)


def cmd_passkey(args) -> int:
    policies = parse_policies("--policies", args.policies)
    budgets = parse_ints("--budgets", args.budgets, lo=2, hi=65536)
    lengths = parse_ints("--lengths", args.lengths, lo=64, hi=65536)
    in_range("--trials", args.trials, 1, 100)
    from lessserve.evals.passkey import eval_passkey
    from lessserve.lab.engines import EngineFactory
    from lessserve.lab.output import markdown_table, write_json
    from lessserve.lab.plots import line_plot

    factory = EngineFactory(eval_engine_config(args, max_context=max(lengths) + 64, max_slots=1))
    rows = eval_passkey(factory, policies, budgets, lengths, args.trials, args.seed)
    print(markdown_table(rows))
    write_json(args.json, rows)
    if args.plot:
        for r in rows:
            r["series"] = f"{r['policy']}@{r['budget']}"
        line_plot(rows, "length", "accuracy", "series", args.plot, "Passkey accuracy vs length")
    return 0


def _register_recall(esub) -> None:
    p = esub.add_parser("recall", help="multi-turn recall: a fact stated turns before the question")
    p.add_argument("--policies", default="full,h2o,lambda,floor",
                   help="engine policies, plus `floor` (the full cache without the fact)")
    p.add_argument("--budgets", default="128")
    p.add_argument("--lengths", default="512,1024,2048", help="history lengths in tokens")
    p.add_argument("--cases", type=int, default=6, help="conversations per length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["plain", "chat"], default="plain",
                   help="plain: User:/Assistant: lines and a completion cue; chat: the model's chat template")
    p.add_argument("--part", choices=["train", "dev", "test"], default="test",
                   help="part of the shared texts the filler turns come from (choose on dev, report test)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: accuracy vs length per policy@budget")
    add_engine_flags(p)
    p.set_defaults(func=cmd_recall)


def cmd_recall(args) -> int:
    from lessserve.evals.recall import FLOOR

    names = [v.strip() for v in args.policies.split(",") if v.strip()]
    engine_policies = [n for n in names if n != FLOOR]
    parsed = iter(parse_policies("--policies", ",".join(engine_policies)) if engine_policies else [])
    policies = [n if n == FLOOR else next(parsed) for n in names]
    if not policies:
        raise CliError("--policies", "no policy given")
    budgets = parse_ints("--budgets", args.budgets, lo=2, hi=65536)
    lengths = parse_ints("--lengths", args.lengths, lo=128, hi=65536)
    in_range("--cases", args.cases, 1, 1000)
    if args.format == "plain" and args.chat_template:
        raise CliError("--chat-template", "the plain format renders with its own template; use --format chat")
    from lessserve.evals.recall import eval_recall
    from lessserve.evals.recall_cases import PLAIN_TEMPLATE
    from lessserve.lab.engines import EngineFactory
    from lessserve.lab.output import markdown_table, write_json
    from lessserve.lab.plots import line_plot

    over = {"chat_template": PLAIN_TEMPLATE} if args.format == "plain" else {}
    factory = EngineFactory(eval_engine_config(args, max_context=max(lengths) + 64, max_slots=1, **over))
    if max(lengths) > factory.ckpt.args.context_len:
        raise CliError("--lengths", f"longer than the model's context of {factory.ckpt.args.context_len} tokens")
    rows = eval_recall(factory, policies, budgets, lengths, args.cases, args.seed, args.format, args.part)
    print(markdown_table(rows))
    write_json(args.json, rows)
    if args.plot:
        for r in rows:
            r["series"] = r["policy"] if r["policy"] in ("full", FLOOR) else f"{r['policy']}@{r['budget']}"
        line_plot(rows, "length", "accuracy", "series", args.plot, f"Multi-turn recall ({args.format} turns)")
    return 0


def _register_report(esub) -> None:
    from lessserve.evals.report import POLICIES
    from lessserve.lab.corpus import DATA_DIR, TEXTS

    p = esub.add_parser("report", help="the whole quality report (JSON, markdown, plots)")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder of the texts")
    p.add_argument("--texts", default=",".join(TEXTS), help="texts of --data-dir whose test part is evaluated")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--budgets", default="64,128,256")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--windows", type=int, default=8, help="windows per text at most (fewer where its test part "
                   "is shorter)")
    p.add_argument("--lengths", default="512,1024,2000", help="passkey lengths (empty: no passkey)")
    p.add_argument("--trials", type=int, default=2, help="passkey trials per depth")
    p.add_argument("--peers", default="docs/results/passkey_peers.json",
                   help="merged kvpress passkey results to show beside ours (skipped when missing)")
    p.add_argument("--out", default="docs/quality", help="output folder")
    p.add_argument("--cache", default=None, help="row cache file (default: <cache dir>/eval-report/rows.jsonl)")
    p.add_argument("--fresh", action="store_true",
                   help="recompute every row (default: reuse rows of an earlier run whose inputs, engine "
                        "config and LESS weights are unchanged)")
    add_engine_flags(p)
    p.set_defaults(func=cmd_report)


def corpus_texts(args) -> dict[str, str]:
    """--texts of --data-dir: name -> path, each checked (a CliError naming the flag otherwise)."""
    from lessserve.lab.corpus import CorpusError, corpus_paths

    try:
        paths = corpus_paths(args.data_dir, [t.strip() for t in args.texts.split(",") if t.strip()])
    except CorpusError as e:
        raise CliError("--texts", str(e)) from None
    texts = {n: str(existing_file("--data-dir", str(p))) for n, p in paths.items()}
    return texts


def cmd_report(args) -> int:
    texts = corpus_texts(args)
    policies = parse_policies("--policies", args.policies)
    budgets = parse_ints("--budgets", args.budgets, lo=2, hi=65536)
    lengths = parse_ints("--lengths", args.lengths, lo=64, hi=65536) if args.lengths.strip() else []
    in_range("--context", args.context, 16, 65536)
    in_range("--windows", args.windows, 1, 1000)
    in_range("--trials", args.trials, 1, 100)
    from lessserve.evals.report import run_report
    from lessserve.evals.row_cache import RowCache
    from lessserve.lab.engines import EngineFactory
    from lessserve.workers.model_loader import cache_root

    factory = EngineFactory(eval_engine_config(args, max_context=max([args.context, *lengths]) + 64, max_slots=1))
    cache = RowCache(None if args.fresh else (args.cache or cache_root() / "eval-report" / "rows.jsonl"))
    command = (f"lessserve eval report --texts {','.join(texts)} --policies {','.join(policies)} "
               f"--budgets {','.join(map(str, budgets))} --context {args.context} --windows {args.windows} "
               f"--lengths {','.join(map(str, lengths)) or repr('')} --trials {args.trials} --out {args.out}")
    rep = run_report(factory, texts, policies, budgets, args.context, args.windows, lengths, args.trials, args.out,
                     cache, peers=args.peers, command=command)
    for g in rep["gap_closed"]:
        plus = (f" (+ baseline: {g['plus_gap_closed']:.1%})" if g.get("plus_gap_closed") is not None else "")
        print(f"{g['text']:16s} {g['policy']:6s} budget {g['budget']:4d}: +less closes {g['gap_closed']:.1%} "
              f"[{g['ci_low']:.1%}, {g['ci_high']:.1%}] of the gap to full" + plus)
    print(f"report written to {args.out}/report.md")
    return 0


def _register_pareto(esub) -> None:
    from lessserve.lab.corpus import DATA_DIR, TEXTS

    p = esub.add_parser("pareto", help="quality per byte: every policy and --kv-bits at equal bytes per session, "
                        "with intervals (JSON, markdown, Pareto plot)")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder of the texts")
    p.add_argument("--texts", default=",".join(TEXTS), help="texts of --data-dir whose --part is evaluated")
    p.add_argument("--part", choices=["train", "dev", "test"], default="test")
    p.add_argument("--extra-texts", default="", help="comma-separated UTF-8 files of genres never trained on, "
                   "evaluated whole (named by their stem)")
    p.add_argument("--policies", default="h2o,h2o+less,lambda,lambda+less")
    p.add_argument("--bits", default="native,8,4", help="kv_bits values compared (native, 8, 4)")
    p.add_argument("--levels", default="64,128,256",
                   help="byte levels, each the bytes of a native h2o slot at this budget (must include --reference)")
    p.add_argument("--reference", type=int, default=128,
                   help="the level whose native h2o slot every gap is closed from (today's slot: 128)")
    p.add_argument("--grid", choices=["all", "h2o"], default="all",
                   help="all: every policy at every level; h2o: every policy at 128, the h2o ones elsewhere")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4, help="windows per text at most")
    p.add_argument("--out", default="docs/quality", help="output folder (pareto.json/.md/.png)")
    p.add_argument("--cache", default=None, help="row cache file (default: <cache dir>/eval-report/rows.jsonl)")
    add_engine_flags(p)
    p.set_defaults(func=cmd_pareto)


def cmd_pareto(args) -> int:
    texts = corpus_texts(args)
    from pathlib import Path

    from lessserve.lab.corpus import text_name

    extra = {text_name(f): str(existing_file("--extra-texts", f.strip()))
             for f in args.extra_texts.split(",") if f.strip()}
    if set(extra) & set(texts) or len(extra) != len([f for f in args.extra_texts.split(",") if f.strip()]):
        raise CliError("--extra-texts", "names (file stems) must differ from each other and from --texts")
    policies = parse_policies("--policies", args.policies)
    if any("recall" in p for p in policies):
        raise CliError("--policies", "+recall keeps native slots; it has no place in a kv_bits comparison")
    from lessserve.workers.config import KV_BITS

    bits = parse_names("--bits", args.bits, KV_BITS)
    levels = parse_ints("--levels", args.levels, lo=2, hi=65536)
    if args.reference not in levels:
        raise CliError("--levels", f"must include --reference {args.reference}, the level every gap is closed from")
    in_range("--context", args.context, 16, 65536)
    in_range("--windows", args.windows, 1, 1000)
    from lessserve.evals.pareto import run_pareto
    from lessserve.evals.row_cache import RowCache
    from lessserve.lab.engines import EngineFactory
    from lessserve.workers.model_loader import cache_root

    factory = EngineFactory(eval_engine_config(args, max_context=args.context + 64, max_slots=1))
    cache = RowCache(args.cache or cache_root() / "eval-report" / "rows.jsonl")
    command = (f"lessserve eval pareto --texts {','.join(texts) or repr('')} --part {args.part} "
               f"--policies {','.join(policies)} "
               f"--bits {','.join(bits)} --levels {','.join(map(str, levels))} --reference {args.reference} "
               f"--grid {args.grid} "
               f"--context {args.context} --windows {args.windows} --out {args.out}"
               + (f" --extra-texts {','.join(Path(p).name for p in extra.values())}" if extra else ""))
    rep = run_pareto(factory, texts, ["full", *policies], bits, levels, args.context, args.windows, args.out, cache,
                     args.part, args.grid, command, args.reference, extra)
    for f in rep["frontier"]:
        print(f"level {f['level']:4d} {f['policy']:12s} kv_bits={f['kv_bits']:6s} budget {f['budget']:5d}: worst "
              f"text {f['worst_text']} {f['worst_gap_closed']:.1%} (CI low {f['worst_ci_low']:.1%})")
    print(f"written to {args.out}/pareto.md")
    return 0


def eval_engine_config(args, **over):
    """The engine flags' config at the evaluations' prefill chunk (EVAL_CHUNK) unless --chunk is given."""
    from lessserve.evals.ppl import EVAL_CHUNK

    return engine_config(args, **({"prefill_chunk": EVAL_CHUNK} if args.chunk is None else {}), **over)


def _register_harness(esub) -> None:
    from lessserve.lab.corpus import TEXTS

    p = esub.add_parser("harness", help="lm-evaluation-harness through the server (/v1/completions), per policy")
    p.add_argument("--policies", default="full,h2o,h2o+less")
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--text", choices=sorted(TEXTS), default="brown", help="which shared text the tasks use")
    p.add_argument("--part", choices=["train", "dev", "test"], default="test")
    p.add_argument("--docs", type=int, default=12, help="documents of the part the tasks are made of")
    p.add_argument("--chars", type=int, default=2000, help="characters of context per document (about 4 per token)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--port", type=int, default=8123, help="the embedded server's port on 127.0.0.1")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: bits per byte per policy")
    p.set_defaults(func=cmd_harness)


def cmd_harness(args) -> int:
    policies = parse_policies("--policies", args.policies)
    in_range("--budget", args.budget, 2, 65536)
    in_range("--docs", args.docs, 2, 10000)
    in_range("--chars", args.chars, 0, 100000)
    in_range("--port", args.port, 1024, 65535)
    if args.limit is not None:
        in_range("--limit", args.limit, 1, 100000)
    from lessserve.evals.harness import bar_plot, run_harness
    from lessserve.lab.output import markdown_table, write_json

    rows = run_harness(policies, args.budget, args.text, args.part, args.docs, args.chars, args.limit, args.port)
    print(markdown_table([{k: v for k, v in r.items() if k != "rolling_ll"} for r in rows]))
    write_json(args.json, rows)
    if args.plot:
        bar_plot(rows, args.plot)
    return 0
