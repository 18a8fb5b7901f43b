"""`lessserve bench interference`: what one long prefill costs everyone else.

Short sessions decode together; meanwhile one long piece of work arrives on the same worker: a new
long prompt, the rebuild of a long conversation whose cache was lost, or a new conversation with a
long system prompt never seen (the shared-prefix path). Reported per case: the short sessions'
inter-token latency (ITL) while the long work runs (p50, p99, max), the long turn's time to first
token, and the stall a one-go prefill of the same tokens would have caused (what the rebuild and
the shared prompt cost every decoding session before they went through the scheduler's chunked
prefill: the time of one `Engine.prefill` of those tokens, measured here on the same engine).
All in process, on one engine, through the worker's own SessionStore and BatchScheduler.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time

from lessserve.bench.offload import history_message
from lessserve.bench.result import BenchResult
from lessserve.cache_store.config import StoreConfig
from lessserve.lab.output import progress
from lessserve.workers.chat_session import encode, render
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.local_sessions import LocalSessions
from lessserve.workers.scheduler import SamplingParams

CASES = ("alone", "long prompt", "rebuild", "shared prompt")
SHORT = [{"role": "user", "content": "Tell me a short story about a lighthouse."}]


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sample."""
    s = sorted(xs)
    return s[max(1, math.ceil(q / 100 * len(s))) - 1]


async def _turn(ss: LocalSessions, sid: str, messages: list[dict], n: int, stamps: list[float]) -> None:
    """One turn; `stamps` receives the arrival time of each token."""
    params = SamplingParams(max_new_tokens=n, stop_ids=())
    async with ss.inner.turn(sid, messages, n) as (chat, ids, tokens):
        async for _ in ss.scheduler.generate(chat.slot, ids, params, tokens, chat.marks):
            stamps.append(time.perf_counter())


async def _case(ss: LocalSessions, case: str, long_sid: str, long_msgs: list[dict], shorts: int, new_tokens: int,
                tag: str) -> tuple[list[float], float | None]:
    """-> (ITLs of the short sessions while the long work ran, or all of them alone; long TTFT)."""
    stamps = [[] for _ in range(shorts)]
    tasks = [asyncio.create_task(_turn(ss, f"{tag}-short-{i}", SHORT, new_tokens, stamps[i])) for i in range(shorts)]
    while not all(len(s) >= 2 for s in stamps):  # every short session is decoding
        await asyncio.sleep(0.005)
    window, ttft = None, None
    if case != "alone":
        long_stamps: list[float] = []
        t0 = time.perf_counter()
        await _turn(ss, long_sid, long_msgs, 1, long_stamps)
        window, ttft = (t0, long_stamps[0]), long_stamps[0] - t0
    await asyncio.gather(*tasks)
    itl = []
    for s in stamps:
        for a, b in zip(s, s[1:], strict=False):
            if window is None or (b > window[0] and a < window[1]):  # the gap overlaps the long work
                itl.append(b - a)
    return itl, ttft


def run_interference(engine_cfg: EngineConfig, long_tokens: int, shorts: int, new_tokens: int,
                     repeats: int) -> BenchResult:
    engine = Engine(engine_cfg.model_copy(update={"max_slots": shorts + 3}))
    ss = LocalSessions(engine, StoreConfig(device_idle_s=None, host_idle_s=None))
    tok, rows = engine.tokenizer, []
    try:
        long_user = history_message(tok, long_tokens, None)
        system = long_user["content"]
        # the one-go stall: one synchronous prefill of the long work's tokens (the old rebuild / prefix path)
        slot = ss.scheduler.call(engine.alloc)
        one_go = []
        ids = encode(tok, render(tok, [long_user]))
        for _ in range(repeats):
            def prefill():
                engine.slab.reset(slot)
                t0 = time.perf_counter()
                engine.prefill(slot, ids)
                return time.perf_counter() - t0

            one_go.append(ss.scheduler.call(prefill))
        ss.scheduler.call(lambda: engine.free(slot))
        stall = statistics.median(one_go)
        for case in CASES:
            itls, ttfts = [], []
            for r in range(repeats):
                tag = f"{case.replace(' ', '-')}-{r}"
                sid = f"{tag}-long"
                if case == "rebuild":  # a long conversation whose cache is lost: its next turn re-prefills it
                    list(ss.turn(sid, [long_user], max_new_tokens=1))
                    ss.run(ss.store.forget_cache(sid))
                    msgs = [*ss.transcript(sid).messages, {"role": "user", "content": "And then?"}]
                elif case == "shared prompt":  # never seen: this turn prefills it (and keeps its copy)
                    msgs = [{"role": "system", "content": f"{tag}. {system}"},
                            {"role": "user", "content": "Which ferry left first?"}]
                else:
                    msgs = [{"role": "user", "content": f"{tag}. {long_user['content']}"}]
                itl, ttft = ss.run(_case(ss, case, sid, msgs, shorts, new_tokens, tag))
                itls += itl
                if ttft is not None:
                    ttfts.append(ttft)
                for sid in [*(f"{tag}-short-{i}" for i in range(shorts)), f"{tag}-long"]:
                    ss.delete(sid)
            row = {"case": case, "itl_samples": len(itls), "itl_p50_ms": percentile(itls, 50) * 1e3,
                   "itl_p99_ms": percentile(itls, 99) * 1e3, "itl_max_ms": max(itls) * 1e3,
                   "long_ttft_s": statistics.median(ttfts) if ttfts else None,
                   "one_go_stall_ms": None if case in ("alone", "long prompt") else stall * 1e3}
            rows.append(row)
            progress(f"{case:14s} ITL p50 {row['itl_p50_ms']:.0f} ms p99 {row['itl_p99_ms']:.0f} ms "
                     f"max {row['itl_max_ms']:.0f} ms ({len(itls)} gaps)")
    finally:
        ss.close()
    meta = {"model": engine.model_id, "policy": engine.policy.name, "budget": engine.cfg.budget,
            "prefill_chunk": engine.cfg.prefill_chunk, "device": str(engine.device), "dtype": str(engine.dtype),
            "long_tokens": len(ids), "short_sessions": shorts, "repeats": repeats}
    return BenchResult("interference", rows, meta=meta, figure=_figure,
                       notes=[f"one-go prefill of the {len(ids)} long tokens: {stall * 1e3:.0f} ms (median of "
                              f"{repeats}): the decode stall the rebuild and the shared prompt caused before"])


def _figure(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["case"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["itl_p99_ms"] for r in rows], width=0.4, label="short sessions' ITL p99")
    stalls = [r["one_go_stall_ms"] or 0 for r in rows]
    ax.bar([i + 0.2 for i in x], stalls, width=0.4, label="one-go prefill stall (before)")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("ms")
    ax.set_title("What one long prefill costs the decoding sessions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
