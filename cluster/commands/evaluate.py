"""`lessserve eval {ppl,passkey}`: quality under each policy and budget."""

from __future__ import annotations

import importlib

EVAL_MODULES = ["eval_ppl", "eval_passkey"]


def register(sub) -> None:
    p = sub.add_parser("eval", help="quality evaluations (perplexity, passkey)")
    esub = p.add_subparsers(dest="eval", required=True)
    for name in EVAL_MODULES:
        try:
            mod = importlib.import_module(f"lessserve.cluster.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"lessserve.cluster.commands.{name}":
                raise
            continue
        mod.register(esub)
