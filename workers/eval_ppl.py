"""Perplexity over text windows processed with continuous eviction (chunked prefill)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lessserve.workers.eval_cache import RowCache, digest_ids
from lessserve.workers.eval_common import EngineFactory
from lessserve.workers.report import progress


def read_text(path: str | Path, max_chars: int | None = None, tail_fraction: float | None = None) -> str:
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if tail_fraction:
        text = text[int(len(text) * (1 - tail_fraction)):]
    return text[:max_chars] if max_chars else text


def token_windows(tokenizer, text: str, context: int, windows: int) -> list[list[int]]:
    """`windows` evenly spaced windows of `context` tokens (deterministic)."""
    need = context * windows
    ids = tokenizer(text[: max(need * 8, 100_000)], add_special_tokens=False)["input_ids"]
    if len(ids) < context:
        raise ValueError(f"text has {len(ids)} tokens, fewer than --context {context}")
    if len(ids) < need:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    starts = [round(i * (len(ids) - context) / max(windows - 1, 1)) for i in range(min(windows, len(ids) // context))]
    return [ids[s : s + context] for s in starts]


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
    rows = []
    runs = [(p, b) for p in policies for b in (budgets if p != "full" else [budgets[0]])]
    cache = cache or RowCache(None)
    for i, (policy, budget) in enumerate(runs):
        engine = factory.make(policy, budget)
        key = factory.row_key(engine, "ppl", windows=digest_ids(wins), context=context)
        if (row := cache.get(key)) is not None:
            rows.append(row)
            progress(f"[{i + 1}/{len(runs)}] {policy:12s} budget={row['budget']:5d} ppl={row['ppl']:.3f} (cached)")
            continue
        t0, total, count = time.time(), 0.0, 0
        for w in wins:
            nll, n = window_nll(engine, w)
            total, count = total + nll, count + n
        row = {"policy": policy, "budget": engine.spec.budget if policy != "full" else context,
               "nominal_budget": budget,
               "ppl": math.exp(total / count), "tokens": count,
               "cache_bytes_per_session": engine.slab.slot_bytes()}
        if engine.less is not None:
            row["kernels_budget"] = int(engine.less.manifest.get("budget", -1))
        rows.append(row)
        cache.put(key, row)
        progress(f"[{i + 1}/{len(runs)}] {policy:12s} budget={row['budget']:5d} ppl={row['ppl']:.3f} "
                 f"({time.time() - t0:.0f}s)")
    return rows
