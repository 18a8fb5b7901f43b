"""Perplexity over text windows processed with continuous eviction (chunked prefill), at given budgets or
at equal bytes (`eval_ppl_equal_bytes`: each policy at the largest budget whose session slot fits N
bytes, in the engine's kv_bits and dtype)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from lessserve.evals.row_cache import RowCache, digest_ids
from lessserve.lab.engines import EngineFactory
from lessserve.lab.equal_bytes import default_equal_bytes, equal_bytes_budget
from lessserve.lab.output import progress
from lessserve.lab.text import read_text, token_windows  # noqa: F401  (read_text re-exported)
from lessserve.workers.compression import Policy

# The evaluations' prefill chunk (their protocol; `--chunk` overrides it): each token is predicted
# with at most 31 tokens of its own chunk uncompressed. Serving prefills in chunks of 256, whose
# decode perplexity docs/bench_chunking.md measures against this one.
EVAL_CHUNK = 32


@torch.inference_mode()
def window_nll(engine, ids: list[int]) -> tuple[float, int]:
    """Sum of next-token NLL over the window and the number of predicted tokens."""
    slot = engine.alloc()
    try:
        logits = engine.prefill(slot, ids, all_logits=True)  # [T, V]
        target = torch.tensor(ids[1:], device=logits.device)
        nll = F.cross_entropy(logits[:-1].float(), target, reduction="sum")
        return float(nll), len(ids) - 1
    finally:
        engine.free(slot)


def eval_ppl(factory: EngineFactory, text: str, policies: list[str], budgets: list[int], context: int,
             windows: int, cache: RowCache | None = None) -> list[dict]:
    wins = token_windows(factory.tokenizer, text, context, windows)
    runs = [(p, b) for p in policies for b in (budgets if p != "full" else [budgets[0]])]
    return ppl_rows(factory, wins, runs, context, cache)


def eval_ppl_equal_bytes(factory: EngineFactory, text: str, policies: list[str], nbytes: int | None, context: int,
                         windows: int, cache: RowCache | None = None) -> list[dict]:
    """Every policy (full has no budget: left out) at the largest budget whose slot fits `nbytes`
    (None: default_equal_bytes) in the factory's kv_bits and dtype. Rows add target_bytes."""
    wins = token_windows(factory.tokenizer, text, context, windows)
    runs = []
    for p in policies:
        if Policy.parse(p).base == "full":
            progress(f"{p}: no budget to fit in bytes, left out of --equal-bytes")
            continue
        probe = factory.make(p, 128)
        nbytes = nbytes or default_equal_bytes(probe)
        runs.append((p, equal_bytes_budget(probe, nbytes)))
    rows = ppl_rows(factory, wins, runs, context, cache)
    for r in rows:
        r["target_bytes"] = nbytes
    return rows


def ppl_rows(factory: EngineFactory, wins: list[list[int]], runs: list[tuple[str, int]], context: int,
             cache: RowCache | None, **cfg) -> list[dict]:
    """One row per (policy, budget) run over the windows; `cfg`: engine config overrides (kv_bits)."""
    rows = []
    cache = cache or RowCache(None)
    for i, (policy, budget) in enumerate(runs):
        engine = factory.make(policy, budget, **cfg)
        key = factory.row_key(engine, "ppl", windows=digest_ids(wins), context=context, per_window=True)
        if (row := cache.get(key)) is not None:
            rows.append(row)
            progress(f"[{i + 1}/{len(runs)}] {policy:12s} budget={row['budget']:5d} ppl={row['ppl']:.3f} (cached)")
            continue
        t0, per_nll, per_tok = time.time(), [], []
        for w in wins:
            nll, n = window_nll(engine, w)
            per_nll.append(nll)
            per_tok.append(n)
        row = {"policy": policy, "budget": engine.spec.budget if policy != "full" else context,
               "nominal_budget": budget, "kv_bits": engine.slab.kv_bits,
               "ppl": math.exp(sum(per_nll) / sum(per_tok)), "tokens": sum(per_tok),
               "cache_bytes_per_session": engine.slab.slot_bytes(),
               "window_nll": per_nll, "window_tokens": per_tok}
        if engine.less is not None:
            row["kernels_budget"] = int(engine.less.manifest.get("budget", -1))
        rows.append(row)
        cache.put(key, row)
        progress(f"[{i + 1}/{len(runs)}] {policy:12s} budget={row['budget']:5d} kv_bits={row['kv_bits']} "
                 f"bytes={row['cache_bytes_per_session']} ppl={row['ppl']:.3f} ({time.time() - t0:.0f}s)")
    return rows
