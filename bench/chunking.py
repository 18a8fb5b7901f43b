"""`lessserve bench chunking`: what a larger prefill chunk costs in quality and buys in speed.

Per policy and prefill chunk: perplexity over the same text windows (continuous eviction, every
token predicted through the compressed cache, as `eval ppl` does) and the prefill time of one
window, against chunk 32 (the old serving chunk). The goal: chunks >= 256 within 1% of chunk 32's
perplexity at budget 128 for both eviction policies.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lessserve.bench.result import BenchResult, Plot
from lessserve.lab.corpus import read_part
from lessserve.lab.engines import EngineFactory
from lessserve.lab.output import progress
from lessserve.lab.text import read_text, token_windows
from lessserve.workers.config import EngineConfig


@torch.inference_mode()
def window_nll(engine, ids: list[int]) -> tuple[float, int, float]:
    """(sum of next-token NLL, tokens predicted, prefill seconds) of one window from an empty slot."""
    slot = engine.alloc()
    try:
        t0 = time.perf_counter()
        logits = engine.prefill(slot, ids, all_logits=True)  # [T, V]
        dt = time.perf_counter() - t0
        nll = F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:], device=logits.device), reduction="sum")
        return float(nll), len(ids) - 1, dt
    finally:
        engine.free(slot)


def run_chunking(base: EngineConfig, policies: list[str], budget: int, chunks: list[int], text_path: str | Path,
                 context: int, windows: int, threads: int = 0, part: str = "test") -> BenchResult:
    """`part`: train | dev | test of the text under the project's split rule, or all of it."""
    if threads:
        torch.set_num_threads(threads)
    text = read_text(text_path) if part == "all" else read_part(text_path, part)
    rows = []
    factory = EngineFactory(base)  # one model; each engine gets its chunk through factory.base
    wins = token_windows(factory.tokenizer, text, context, windows)
    ref_chunk = min(chunks)
    window_nll(factory.make(policies[0], budget), wins[0][:64])  # warm-up: one-time initialisation is not timed
    for chunk in chunks:
        factory.base = base.model_copy(update={"prefill_chunk": chunk, "max_context": context + 8})
        for policy in policies:
            engine = factory.make(policy, budget)
            nll, n, secs = 0.0, 0, []
            for ids in wins:
                a, b, dt = window_nll(engine, ids)
                nll, n = nll + a, n + b
                secs.append(dt)
            ppl = math.exp(nll / n)
            rows.append({"policy": policy, "budget": budget, "chunk": chunk, "ppl": ppl,
                         "prefill_s_per_window": sum(secs) / len(secs), "tokens": n})
            progress(f"{policy} chunk {chunk}: ppl {ppl:.3f}, {sum(secs) / len(secs):.2f} s per window")
    ref = {r["policy"]: r for r in rows if r["chunk"] == ref_chunk}
    for r in rows:
        base_row = ref[r["policy"]]
        r[f"ppl_vs_chunk{ref_chunk}_pct"] = 100 * (r["ppl"] / base_row["ppl"] - 1)
        r["prefill_speedup"] = base_row["prefill_s_per_window"] / r["prefill_s_per_window"]
    meta = {"device": str(factory.device), "text": Path(text_path).name, "part": part, "context": context,
            "windows": windows, "torch threads": torch.get_num_threads()}
    return BenchResult("chunking", rows, meta, plot=Plot("chunk", "ppl", "policy", f"perplexity by prefill chunk, "
                                                         f"budget {budget}", logx=True))
