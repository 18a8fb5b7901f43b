"""`lessserve bench structured`: what constrained decoding costs per decode step, in process on the
scheduler (the server's generation loop). The same prompt and batch are decoded free, under a
regular expression and under a JSON schema; each step is split into the engine's forward pass
(`on_step`'s decode time) and everything else the loop does per step (sampling, and under a
grammar the llguidance mask and its application), so the grammar's share is read directly."""

from __future__ import annotations

import asyncio
import statistics
import time

import llguidance

from lessserve.bench.result import BenchResult, Plot
from lessserve.lab.output import progress
from lessserve.workers.chat_session import encode, render
from lessserve.workers.config import EngineConfig
from lessserve.workers.constraints import json_schema_grammar
from lessserve.workers.engine import Engine
from lessserve.workers.scheduler import BatchScheduler, SamplingParams

PEOPLE = {"type": "object", "properties": {"people": {"type": "array", "minItems": 3, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                     "city": {"type": "string"}}, "required": ["name", "age", "city"]}}},
          "required": ["people"]}
PROSE = r"[A-Za-z][a-z ,.]{1,2000}"


def grammars() -> dict[str, str | None]:
    return {"free": None, "regex": llguidance.LLMatcher.grammar_from_regex(PROSE),
            "json_schema": json_schema_grammar(PEOPLE)}


def one_run(sched: BatchScheduler, engine: Engine, ids: list[int], batch: int, tokens: int,
            grammar: str | None) -> dict:
    steps: list[tuple[str, float]] = []
    sched.on_step = lambda kind, n, dt: steps.append((kind, dt))
    slots = [sched.call(engine.alloc) for _ in range(batch)]
    counts = [0] * batch

    async def one(i: int) -> None:
        c = engine.grammars.constraint(grammar) if grammar else None
        params = SamplingParams(max_new_tokens=tokens, stop_ids=(), constraint=c)
        async for _ in sched.generate(slots[i], ids, params):
            counts[i] += 1

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(batch)))
        return time.perf_counter() - t0

    wall = asyncio.run(main())
    sched.on_step = None
    for s in slots:
        sched.call(lambda s=s: engine.free(s))
    decode = [dt for kind, dt in steps if kind == "decode"]
    prefill = sum(dt for kind, dt in steps if kind == "prefill")
    other = max(wall - prefill - sum(decode), 0.0) / max(len(decode), 1)
    return {"decode_ms": statistics.mean(decode) * 1e3 if decode else 0.0, "other_ms": other * 1e3,
            "steps": len(decode), "tokens": sum(counts), "wall_s": wall}


def run_structured(engine_cfg: EngineConfig, batches: list[int], tokens: int, repeats: int) -> BenchResult:
    engine = Engine(engine_cfg.model_copy(update={"max_slots": max(batches)}))
    tok = engine.tokenizer
    ids = encode(tok, render(tok, [{"role": "user", "content": "Describe three people and their cities."}]))
    rows = []
    with BatchScheduler(engine) as sched:
        engine.grammars.constraint(grammars()["regex"])  # the tokenizer's llguidance view, built once
        for b in batches:
            free_other = None
            for mode, grammar in grammars().items():
                runs = [one_run(sched, engine, ids, b, tokens, grammar) for _ in range(repeats)]
                best = min(runs, key=lambda r: r["other_ms"])  # the least disturbed run
                row = {"mode": mode, "batch": b, "steps": best["steps"], "tokens": best["tokens"],
                       "decode_ms_per_step": best["decode_ms"], "other_ms_per_step": best["other_ms"],
                       "step_ms": best["decode_ms"] + best["other_ms"]}
                if mode == "free":
                    free_other = best["other_ms"]
                row["grammar_ms_per_step"] = best["other_ms"] - free_other
                row["grammar_share_of_step"] = row["grammar_ms_per_step"] / row["step_ms"]
                rows.append(row)
                progress(f"batch {b:3d} {mode:12s}: step {row['step_ms']:.2f} ms (forward {best['decode_ms']:.2f}, "
                         f"rest {best['other_ms']:.3f}); grammar {row['grammar_ms_per_step']:+.3f} ms/step")
    meta = {"device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
            "policy": engine.policy.name, "budget": engine.cfg.budget, "max_new_tokens": tokens}
    return BenchResult("structured", rows, meta,
                       plot=Plot("batch", "step_ms", "mode", "decode step (ms) by batch: free vs constrained"),
                       notes=["other_ms_per_step: the loop's work besides the forward pass (sampling, masks); "
                              "grammar_ms_per_step: that minus the free run's"])
