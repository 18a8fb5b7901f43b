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
from lessserve.lab.bootstrap import ppl_ratio_ci
from lessserve.lab.corpus import read_part
from lessserve.lab.engines import EngineFactory
from lessserve.lab.output import progress
from lessserve.lab.text import read_text, token_windows
from lessserve.workers.config import EngineConfig

BLOCK = 16  # decoded tokens per bootstrap unit (neighbouring tokens' losses are not independent)


@torch.inference_mode()
def window_nll(engine, ids: list[int], tail: int = 0) -> dict:
    """One window from an empty slot: the first len(ids) - tail tokens prefilled in the engine's
    chunks (every one predicted), then the last `tail` decoded one at a time (teacher-forced), so
    those are predicted through the cache the chunked prefill left. Sums of next-token NLL."""
    slot = engine.alloc()
    try:
        head = ids[: len(ids) - tail]
        t0 = time.perf_counter()
        logits = engine.prefill(slot, head, all_logits=True)  # [T - tail, V]
        dt = time.perf_counter() - t0
        nxt = torch.tensor(ids[1:], device=logits.device)
        nll = F.cross_entropy(logits[:-1].float(), nxt[: len(head) - 1], reduction="sum")
        tail_nll, last = [], logits[-1]
        for i in range(len(head), len(ids)):  # logits of token i come from the step that fed token i - 1
            tail_nll.append(float(F.cross_entropy(last[None].float(), nxt[i - 1 : i], reduction="sum")))
            if i < len(ids) - 1:
                last = engine.decode([slot], [ids[i]])[0]
        return {"nll": float(nll) + sum(tail_nll), "tokens": len(ids) - 1, "prefill_s": dt,
                "tail_nll": sum(tail_nll), "tail_token_nll": tail_nll}
    finally:
        engine.free(slot)


def run_chunking(base: EngineConfig, policies: list[str], budget: int, chunks: list[int], text_path: str | Path,
                 context: int, windows: int, threads: int = 0, part: str = "test", tail: int = 0) -> BenchResult:
    """`part`: train | dev | test of the text under the project's split rule, or all of it. `tail`:
    the last tokens of each window decoded one at a time after the chunked prefill (`decode_ppl`)."""
    if threads:
        torch.set_num_threads(threads)
    text = read_text(text_path) if part == "all" else read_part(text_path, part)
    rows, blocks = [], {}  # blocks: (policy, chunk) -> NLL sums of BLOCK decoded tokens, window by window
    factory = EngineFactory(base)  # one model; each engine gets its chunk through factory.base
    wins = token_windows(factory.tokenizer, text, context, windows)
    ref_chunk = min(chunks)
    window_nll(factory.make(policies[0], budget), wins[0][:64], min(tail, 8))  # one-time initialisation, untimed
    for chunk in chunks:
        factory.base = base.model_copy(update={"prefill_chunk": chunk, "max_context": context + 8})
        for policy in policies:
            engine = factory.make(policy, budget)
            res = [window_nll(engine, ids, tail) for ids in wins]
            ppl = math.exp(sum(r["nll"] for r in res) / sum(r["tokens"] for r in res))
            secs = sum(r["prefill_s"] for r in res) / len(res)
            row = {"policy": policy, "budget": budget, "chunk": chunk, "ppl": ppl, "prefill_s_per_window": secs,
                   "tokens": sum(r["tokens"] for r in res)}
            if tail:
                row["decode_ppl"] = math.exp(sum(r["tail_nll"] for r in res) / (tail * len(res)))
                blocks[(policy, chunk)] = [sum(r["tail_token_nll"][i : i + BLOCK]) for r in res
                                           for i in range(0, tail, BLOCK)]
            rows.append(row)
            progress(f"{policy} chunk {chunk}: ppl {ppl:.3f}"
                     + (f", decode ppl {row['decode_ppl']:.3f}" if tail else "") + f", {secs:.2f} s per window")
    ref = {r["policy"]: r for r in rows if r["chunk"] == ref_chunk}
    for r in rows:
        base_row = ref[r["policy"]]
        r[f"ppl_vs_chunk{ref_chunk}_pct"] = 100 * (r["ppl"] / base_row["ppl"] - 1)
        if tail:  # paired over blocks of decoded tokens: the same tokens under both chunk sizes
            x, ref_x = blocks[(r["policy"], r["chunk"])], blocks[(r["policy"], ref_chunk)]
            ci = ppl_ratio_ci(x, ref_x, [min(BLOCK, tail - i) for _ in wins for i in range(0, tail, BLOCK)])
            r[f"decode_ppl_vs_chunk{ref_chunk}_pct"] = ci["value"]
            r[f"decode_ppl_vs_chunk{ref_chunk}_ci95"] = [ci["low"], ci["high"]]
        r["prefill_speedup"] = base_row["prefill_s_per_window"] / r["prefill_s_per_window"]
    meta = {"device": str(factory.device), "text": Path(text_path).name, "part": part, "context": context,
            "windows": windows, "decode_tail": tail, "torch threads": torch.get_num_threads()}
    y, what = ("decode_ppl", f"ppl of {tail} decoded tokens") if tail else ("ppl", "perplexity")
    return BenchResult("chunking", rows, meta, plot=Plot("chunk", y, "policy", f"{what} by prefill chunk, "
                                                         f"budget {budget}", logx=True))
