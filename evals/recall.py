"""Multi-turn recall (issue 27, item 1): does a session still know a fact stated turns ago?

Each conversation (evals/recall_cases.py) runs through the session path a worker uses per turn:
LocalSessions.turn (SessionStore.open_turn, the BatchScheduler's generation, close_turn) with the
whole history resent each turn, and between turns the session is offloaded to the host tier and
restored. Filler turns generate one token (their assistant replies are fixed ACKs, never the
model's), so the cache consumes the history turn by turn; the question turn answers greedily. The
compression never sees the question while it compresses the fact.

Rows per (policy, budget, length): accuracy with a 95% Wilson interval. `full` is the ceiling;
`floor` is the full cache on the same conversations with the fact sentence removed (what the
model guesses without it).
"""

from __future__ import annotations

import copy
import math
import time

from lessserve.cache_store.config import StoreConfig
from lessserve.evals.recall_cases import (
    ANSWER_TOKENS,
    PLAIN_TEMPLATE,
    RecallCase,
    answer_ok,
    messages_at,
    recall_cases,
)
from lessserve.lab.corpus import shared_parts
from lessserve.lab.engines import EngineFactory
from lessserve.lab.output import progress
from lessserve.workers.local_sessions import LocalSessions

FLOOR = "floor"  # not an engine policy: the full cache without the fact
UNBUDGETED = ("full", FLOOR)  # one row per length, whatever the budgets


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion hits/n (stays inside [0, 1] and is not
    degenerate at 0 or n hits, unlike the normal approximation)."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def case_tokenizer(factory: EngineFactory, fmt: str):
    """The tokenizer the engines render with: the plain format's template, or the model's own."""
    tok = factory.tokenizer
    if fmt == "plain":
        tok = copy.copy(tok)
        tok.chat_template = PLAIN_TEMPLATE
    elif factory.base.chat_template:
        from lessserve.workers.engine import read_chat_template

        tok = copy.copy(tok)
        tok.chat_template = read_chat_template(factory.base.chat_template)
    return tok


def run_conversation(sessions: LocalSessions, sid: str, case: RecallCase, fmt: str, floor: bool = False) -> str:
    """Every turn of `case` through the session path; returns the question turn's answer. Between
    turns the session goes to the host tier and back, as an idle session does."""
    answer = ""
    for t in range(case.turns):
        last = t == case.question_turn
        msgs = messages_at(case, t, fmt, floor)
        answer = "".join(sessions.turn(sid, msgs, max_new_tokens=ANSWER_TOKENS if last else 1))
        if not last:
            sessions.offload(sid, "host")
            sessions.restore(sid)
    sessions.delete(sid)
    return answer


def tier_counts(sessions: LocalSessions) -> dict[str, int]:
    """Restores from the host tier and recomputes so far: every turn after the first must be a host
    restore and none a recompute (a rebuilt cache would not be the compressed path under test)."""
    st = sessions.stats()
    return {"host_restores": st["host"]["restores"], "recomputes": st["total"]["recomputes"]}


def score_row(policy: str, budget: int, length: int, cases: list[RecallCase], hits: list[bool], fmt: str) -> dict:
    """One result row: accuracy, its Wilson interval and the cases' shape."""
    lo, hi = wilson(sum(hits), len(hits))
    return {"policy": policy, "budget": budget, "length": length, "accuracy": sum(hits) / len(hits),
            "ci_low": lo, "ci_high": hi, "cases": len(hits), "format": fmt,
            "turns": sum(c.turns for c in cases) / len(cases),
            "tokens": round(sum(c.tokens for c in cases) / len(cases)),
            "distance_tokens": round(sum(c.distance_tokens for c in cases) / len(cases))}


def eval_recall(factory: EngineFactory, policies: list[str], budgets: list[int], lengths: list[int],
                cases: int = 6, seed: int = 0, fmt: str = "plain", part: str = "test") -> list[dict]:
    """Rows per (policy, budget, length); `full` and `floor` once per length. The factory's base
    config must carry the format's chat template and a max_context covering max(lengths)."""
    convs = recall_cases(case_tokenizer(factory, fmt), lengths, cases, seed, shared_parts(part), fmt)
    runs = [(p, b) for p in policies for b in (budgets[:1] if p in UNBUDGETED else budgets)]
    rows = []
    for i, (policy, budget) in enumerate(runs):
        engine = factory.make("full" if policy == FLOOR else policy, budget)
        shown = engine.spec.budget if policy in UNBUDGETED else budget
        with LocalSessions(engine, StoreConfig(device_idle_s=None, host_idle_s=None)) as sessions:
            for L in lengths:
                t0, hits, before = time.time(), [], tier_counts(sessions)
                for k, case in enumerate(convs[L]):
                    answer = run_conversation(sessions, f"recall-{L}-{k}", case, fmt, floor=policy == FLOOR)
                    hits.append(answer_ok(answer, case))
                    progress(f"  {policy}@{shown} L={L} case {k + 1}/{len(convs[L])} {case.kind}={case.answer!r} "
                             f"-> {answer.strip()[:40]!r} {'ok' if hits[-1] else 'miss'}")
                rows.append(score_row(policy, shown, L, convs[L], hits, fmt))
                after = tier_counts(sessions)
                rows[-1].update({k: after[k] - before[k] for k in after})
                r = rows[-1]
                progress(f"[{i + 1}/{len(runs)}] {policy:12s} budget={shown:5d} length={L:5d} "
                         f"acc={r['accuracy']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] ({time.time() - t0:.0f}s)")
    return rows
