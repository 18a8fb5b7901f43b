"""Batched decode of N sessions at a given context: this engine (compressed slots) against
transformers' own model with its full DynamicCache, side by side in one run, in the engine's dtype
with transformers' SDPA attention and the same torch threads."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch

from lessserve.bench.result import BenchResult, Plot
from lessserve.bench.timer import Timer
from lessserve.lab.engines import EngineFactory
from lessserve.lab.output import progress
from lessserve.lab.text import token_windows
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine

ROUNDS = 3  # with --compile: eager and compiled timed in turn, this many times (the pair's ratio per round)


def _time_steps(step, steps: int, device: torch.device, warmup: int = 2) -> float:
    """Seconds for `steps` decode steps (median step x steps; the cache grows by one token a step)."""
    return Timer(device, warmup, steps)(step) * steps


@torch.inference_mode()
def decode_engine(factory: EngineFactory, policy: str, budget: int, batch: int, prompt: list[int],
                  prefilled: dict, compile: bool = False, kv_bits: str | None = None
                  ) -> tuple[Engine, Callable[[], object], dict]:
    """An engine with `batch` sessions at the prompt's state, its decode step, and (`compile`: the
    engine's compile switch on) the time of its warm-up, a compile per batch bucket. `kv_bits`:
    another slot format than the factory's (its own prefill, its own entry in `prefilled`)."""
    engine = factory.make(policy, budget, max_slots=batch, compile=compile,
                          **({"kv_bits": kv_bits} if kv_bits else {}))
    slots = [engine.alloc() for _ in range(batch)]
    key = ("state", engine.slab.kv_bits, engine.spec.budget)
    if key not in prefilled:  # one real prefill per slot format for the whole run, copied into every slot
        engine.prefill(slots[0], prompt)
        prefilled[key] = engine.slab.export(slots[0])
    for s in slots:
        engine.slab.load(s, prefilled[key])
    extra = {}
    if compile:
        t0 = time.perf_counter()
        eager = engine.warm_up()
        extra = {"compile_s": time.perf_counter() - t0, "eager_buckets": sorted(eager)}
    toks = [1] * batch
    return engine, lambda: engine.decode(slots, toks), extra


def engine_row(engine: Engine, batch: int, context: int, steps: int, dt: float, extra: dict) -> dict:
    bits = engine.slab.kv_bits
    name = (f"lessserve {engine.cfg.policy}" + (f" {bits}-bit" if bits != "native" else "")
            + (" + torch.compile" if engine.compiled is not None else ""))
    return {"system": name, "budget": engine.spec.budget, "kv_bits": bits, "batch": batch, "context": context,
            "tokens_per_s": batch * steps / dt, "cache_bytes_per_session": engine.slab.slot_bytes(),
            "dtype": str(engine.dtype).removeprefix("torch."), **extra}


def load_transformers(folder, dtype: torch.dtype, device):
    """transformers' own model of the checkpoint, in `dtype`, with SDPA attention (its fast path)."""
    from lessserve.workers.model_loader import transformers_model

    return transformers_model(folder, dtype, attn_implementation="sdpa").to(device).eval()


@torch.inference_mode()
def bench_transformers(hf, batch: int, context: int, steps: int, prompt: list[int], device, prefilled: dict) -> dict:
    from transformers import DynamicCache

    if "cache" not in prefilled:  # one real prefill for the whole run, copied per batch
        prefilled["cache"] = DynamicCache()
        hf(torch.tensor([prompt], device=device), past_key_values=prefilled["cache"], use_cache=True)
    cache = copy.deepcopy(prefilled["cache"])
    cache.batch_repeat_interleave(batch)
    nxt = torch.ones(batch, 1, dtype=torch.long, device=device)

    def step():  # generate()'s inner loop: the cache grows by `steps` tokens, ~1% of the context
        hf(nxt, past_key_values=cache, use_cache=True)

    dt = _time_steps(step, steps, device)
    a = hf.config
    isz = next(hf.parameters()).element_size()
    kv = 2 * a.num_hidden_layers * a.num_key_value_heads * context * (a.hidden_size // a.num_attention_heads) * isz
    return {"system": "transformers full (sdpa)", "budget": context, "batch": batch, "context": context,
            "tokens_per_s": batch * steps / dt, "cache_bytes_per_session": kv,
            "dtype": str(next(hf.parameters()).dtype).removeprefix("torch.")}


def equal_bytes_engines(factory: EngineFactory, native: Engine, bits: list[str], batch: int, prompt: list[int],
                        prefilled: dict) -> list[tuple[Engine, Callable[[], object]]]:
    """The native engine's policy in each of `bits` at the largest budget whose slot fits the native slot's bytes."""
    from lessserve.lab.equal_bytes import equal_bytes_budget

    policy, budget, nbytes = native.cfg.policy, native.cfg.budget, native.slab.slot_bytes()
    out = []
    for b in bits:
        fit = equal_bytes_budget(factory.make(policy, budget, kv_bits=b), nbytes)
        engine, step, _ = decode_engine(factory, policy, fit, batch, prompt, prefilled, kv_bits=b)
        out.append((engine, step))
    return out


def bench_decode(factory: EngineFactory, policy: str, budget: int, batches: list[int], context: int,
                 steps: int, compile: bool = False, equal_bytes: list[str] = ()) -> list[dict]:
    """Per batch: the engine's policy (and `compile`: through torch.compile; `equal_bytes`: in these
    kv_bits at the budget of the same slot bytes, timed in turn with it) against transformers."""
    tok = factory.tokenizer
    text = " ".join(["The history of the river valley is long and full of small stories."] * (context // 4))
    prompt = token_windows(tok, text, context, 1)[0]
    hf, ours_state, hf_state = None, {}, {}
    rows = []
    for b in batches:
        progress(f"batch {b}: lessserve {policy}" + (" eager and + torch.compile (compiling)" if compile else ""))
        engine, step, _ = decode_engine(factory, policy, budget, b, prompt, ours_state)
        comp = decode_engine(factory, policy, budget, b, prompt, ours_state, compile=True) if compile else None
        same = equal_bytes_engines(factory, engine, list(equal_bytes), b, prompt, ours_state)
        t_eager, t_comp, t_same = [], [], [[] for _ in same]
        for _ in range(ROUNDS if compile or same else 1):  # in turn, so drift on a shared machine hits all alike
            t_eager.append(_time_steps(step, steps, factory.device))
            if comp:
                t_comp.append(_time_steps(comp[1], steps, factory.device))
            for (_, st), t in zip(same, t_same, strict=True):
                t.append(_time_steps(st, steps, factory.device))
        ours = engine_row(engine, b, context, steps, statistics.median(t_eager), {})
        if hf is None:
            hf = load_transformers(factory.ckpt.folder, getattr(torch, ours["dtype"]), factory.device)
        progress(f"batch {b}: transformers full cache ...")
        ref = bench_transformers(hf, b, context, steps, prompt, factory.device, hf_state)
        ours["speedup_vs_transformers"] = ours["tokens_per_s"] / ref["tokens_per_s"]
        ours["cache_ratio_vs_transformers"] = ref["cache_bytes_per_session"] / ours["cache_bytes_per_session"]
        rows += [ours, ref]
        for (eng, _), t in zip(same, t_same, strict=True):
            ratios = [e / q for e, q in zip(t_eager, t, strict=True)]
            row = engine_row(eng, b, context, steps, statistics.median(t), {})
            row.update(speedup_vs_transformers=row["tokens_per_s"] / ref["tokens_per_s"],
                       speedup_vs_native_same_bytes=statistics.median(ratios),
                       speedup_vs_native_same_bytes_range=[min(ratios), max(ratios)],
                       native_budget=ours["budget"], native_bytes=ours["cache_bytes_per_session"])
            rows.append(row)
        if comp:
            row = engine_row(comp[0], b, context, steps, statistics.median(t_comp), comp[2])
            ratios = [e / c for e, c in zip(t_eager, t_comp, strict=True)]
            row["speedup_vs_transformers"] = row["tokens_per_s"] / ref["tokens_per_s"]
            row["speedup_vs_eager"] = statistics.median(ratios)
            row["speedup_vs_eager_range"] = [min(ratios), max(ratios)]
            rows.append(row)
    return rows


def run_decode(engine: EngineConfig, batches: list[int], context: int, steps: int, threads: int = 0,
               compile: bool = False, equal_bytes: list[str] = ()) -> BenchResult:
    """`lessserve bench decode`: the engine's policy against transformers' full cache, per batch (and
    `equal_bytes`: the same policy in quantised slots of the same bytes)."""
    if threads:
        torch.set_num_threads(threads)
    longest = context + ROUNDS * (steps + 2) + 8  # the full policy's sessions grow by every timed step
    factory = EngineFactory(engine.model_copy(update={"max_context": longest}))
    rows = bench_decode(factory, engine.policy, engine.budget, batches, context, steps, compile, equal_bytes)
    dev = factory.device
    note = " (CPU figures are ratios only; absolute times need a GPU)" if dev.type == "cpu" else ""
    meta = {"device": f"{dev}{note}", "torch threads": torch.get_num_threads(),
            "prefill_chunk": factory.base.prefill_chunk}
    return BenchResult("decode", rows, meta,
                       plot=Plot("batch", "tokens_per_s", "system", f"decode tokens/s, context {context}"))
