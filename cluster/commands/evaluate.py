"""`lessserve eval {ppl,passkey}`: quality under each policy and budget."""

from __future__ import annotations

from lessserve.cluster.commands.common import register_group

EVAL_MODULES = ["eval_ppl", "eval_passkey", "eval_report"]


def register(sub) -> None:
    register_group(sub, "eval", "quality evaluations (perplexity, passkey)", EVAL_MODULES)
