"""Passkey retrieval: a 5-digit key hidden at a depth of filler text, asked for at the end with a
plain completion prompt (no chat template), answered greedily."""

from __future__ import annotations

import time

from lessserve.evals.passkey_prompts import (  # noqa: F401  (re-exported)
    DEPTHS,
    FILLER,
    INTRO,
    QUESTION,
    answer_ok,
    build_prompt,
    passkey_cases,
)
from lessserve.evals.row_cache import RowCache, digest_ids
from lessserve.lab.engines import EngineFactory
from lessserve.lab.output import progress
from lessserve.workers.scheduler import BatchScheduler, SamplingParams


def eval_passkey(factory: EngineFactory, policies: list[str], budgets: list[int], lengths: list[int],
                 trials_per_depth: int = 1, seed: int = 0, cache: RowCache | None = None) -> list[dict]:
    tok = factory.tokenizer
    cases = passkey_cases(tok, lengths, trials_per_depth, seed)
    prompts = {L: [(ids, k) for ids, k, _ in cs] for L, cs in cases.items()}
    runs = [(p, b) for p in policies for b in (budgets if p != "full" else [budgets[0]])]
    rows = []
    cache = cache or RowCache(None)
    for i, (policy, budget) in enumerate(runs):
        engine = factory.make(policy, budget)
        for L in lengths:
            rk = factory.row_key(engine, "passkey", prompts=digest_ids(ids for ids, _ in prompts[L]), length=L)
            if (row := cache.get(rk)) is not None:
                rows.append(row)
                continue
            t0, hits = time.time(), 0
            with BatchScheduler(engine) as sched:  # the server's generation loop; 8 tokens, no stop id
                for ids, key in prompts[L]:
                    hits += answer_ok(tok, sched.complete(ids, SamplingParams(max_new_tokens=8)), key)
            row = {"policy": policy, "budget": engine.spec.budget if policy != "full" else max(lengths),
                   "length": L, "accuracy": hits / len(prompts[L]), "trials": len(prompts[L])}
            rows.append(row)
            cache.put(rk, row)
            progress(f"[{i + 1}/{len(runs)}] {policy:12s} budget={row['budget']:5d} length={L:5d} "
                     f"acc={row['accuracy']:.2f} ({time.time() - t0:.0f}s)")
    return rows
