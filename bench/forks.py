"""`lessserve bench forks`: what a fork and a shared prefix cost, in process on the engine.

- fork: SessionStore.fork of a session with an H-token history (one compressed slot copied on the
  device) against a fresh prefill of the same history at the engine's serving chunk size; bytes
  copied = one slot, whatever H is;
- shared prefix: the first-turn TTFT of a new conversation whose 1,000-token system prompt this
  worker already prefilled (a copy of its state, then only the user message) against a cold first
  turn (a system prompt never seen: the whole history prefilled).
"""

from __future__ import annotations

import statistics
import time
import uuid

from lessserve.bench.offload import history_message, ttft
from lessserve.bench.result import BenchResult
from lessserve.cache_store.config import StoreConfig
from lessserve.lab.output import progress
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.local_sessions import LocalSessions


def run_forks(engine_cfg: EngineConfig, histories: list[int], prompt_tokens: int, repeats: int) -> BenchResult:
    engine = Engine(engine_cfg.model_copy(update={"max_slots": 4, "max_context": max(histories) + 512}))
    ss = LocalSessions(engine, StoreConfig(device_idle_s=None, host_idle_s=None))
    rows = []
    try:
        for n in histories:
            first = [history_message(engine.tokenizer, n, None)]
            list(ss.turn("src", first, max_new_tokens=1))
            ids = list(ss.transcript("src").ids)
            forks, prefills = [], []
            for _ in range(repeats):
                dst = f"fork-{uuid.uuid4().hex[:6]}"
                t0 = time.perf_counter()
                assert ss.fork("src", dst)
                forks.append(time.perf_counter() - t0)
                ss.delete(dst)
                slot = engine.alloc()
                t0 = time.perf_counter()
                engine.prefill(slot, ids)
                prefills.append(time.perf_counter() - t0)
                engine.free(slot)
            f, p = statistics.median(forks), statistics.median(prefills)
            rows.append({"case": "fork", "history_tokens": len(ids), "fork_ms": f * 1e3, "prefill_ms": p * 1e3,
                         "prefill/fork": p / f, "bytes_copied": engine.slab.slot_bytes()})
            progress(f"fork of a {len(ids)}-token history: {f * 1e3:.2f} ms vs prefill {p * 1e3:.0f} ms")
            ss.delete("src")
        system = history_message(engine.tokenizer, prompt_tokens, None)["content"]
        warm, cold = [], []
        for i in range(repeats + 1):
            shared = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: how?"}]
            t = ttft(ss, f"warm-{i}", shared)
            if i:  # the first one builds the prefix
                warm.append(t)
            unseen = [{"role": "system", "content": f"{i} {system}"}, {"role": "user", "content": "How?"}]
            cold.append(ttft(ss, f"cold-{i}", unseen))
            for s in (f"warm-{i}", f"cold-{i}"):
                ss.delete(s)
        w, c = statistics.median(warm), statistics.median(cold)
        rows.append({"case": "shared prefix", "history_tokens": len(ss.engine.tokenizer(system)["input_ids"]),
                     "ttft_warm_ms": w * 1e3, "ttft_cold_ms": c * 1e3, "cold/warm": c / w,
                     "prefix_builds": ss.stats()["total"]["prefix_builds"]})
        progress(f"shared {prompt_tokens}-token prompt: first-turn TTFT {w * 1e3:.0f} ms vs cold {c * 1e3:.0f} ms")
    finally:
        ss.close()
    meta = {"device": str(engine.device), "policy": engine.policy.name, "budget": engine.cfg.budget,
            "prefill_chunk": engine.cfg.prefill_chunk}
    return BenchResult("forks", rows, meta)
