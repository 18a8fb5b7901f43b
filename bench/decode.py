"""Batched decode of N sessions at a given context: this engine (compressed slots) against
transformers' own model with its full DynamicCache, side by side in one run, in the engine's dtype
with transformers' SDPA attention and the same torch threads."""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from lessserve.bench.result import BenchResult, Plot
from lessserve.bench.timer import Timer
from lessserve.lab.engines import EngineFactory
from lessserve.lab.output import progress
from lessserve.lab.text import token_windows
from lessserve.workers.config import EngineConfig


def _time_steps(step, steps: int, device: torch.device, warmup: int = 2) -> float:
    """Seconds for `steps` decode steps (median step x steps; the cache grows by one token a step)."""
    return Timer(device, warmup, steps)(step) * steps


@torch.inference_mode()
def bench_engine(factory: EngineFactory, policy: str, budget: int, batch: int, context: int, steps: int,
                 prompt: list[int], prefilled: dict, time_first: bool = False) -> dict:
    """`time_first`: also time the first step on its own (`first_step_s`: a compile, when compiled)."""
    engine = factory.make(policy, budget, max_slots=batch)
    slots = [engine.alloc() for _ in range(batch)]
    if "state" not in prefilled:  # one real prefill for the whole run, copied into every slot
        engine.prefill(slots[0], prompt)
        prefilled["state"] = engine.slab.export(slots[0])
    for s in slots:
        engine.slab.load(s, prefilled["state"])
    toks = [1] * batch
    first = {}
    if time_first:
        t0 = time.perf_counter()
        engine.decode(slots, toks)
        first["first_step_s"] = time.perf_counter() - t0
    dt = _time_steps(lambda: engine.decode(slots, toks), steps, engine.device)
    return {"system": f"lessserve {policy}", "budget": engine.spec.budget, "batch": batch, "context": context,
            "tokens_per_s": batch * steps / dt, "cache_bytes_per_session": engine.slab.slot_bytes(),
            "dtype": str(engine.dtype).removeprefix("torch."), **first}


def load_transformers(folder, dtype: torch.dtype, device):
    """transformers' own model of the checkpoint, in `dtype`, with SDPA attention (its fast path)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa").to(device).eval()


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


@contextlib.contextmanager
def compiled_step():
    """The engine's per-layer compressed step (attention + evict-and-absorb, the fast torch path)
    through torch.compile (inductor) for as long as the block runs; the model's matmuls stay eager."""
    from lessserve.kernels import ops

    eager = ops.attend_evict_fast
    ops.attend_evict_fast = torch.compile(eager, dynamic=False)
    try:
        yield
    finally:
        ops.attend_evict_fast = eager


def bench_compiled(factory: EngineFactory, policy: str, budget: int, batch: int, context: int, steps: int,
                   prompt: list[int], prefilled: dict) -> dict:
    """`bench_engine` with the step compiled; its first (compiling) step is timed apart."""
    with compiled_step():
        row = bench_engine(factory, policy, budget, batch, context, steps, prompt, prefilled, time_first=True)
    compile_s = row.pop("first_step_s")
    return {**row, "system": f"lessserve {policy} + torch.compile", "compile_s": compile_s}


def bench_decode(factory: EngineFactory, policy: str, budget: int, batches: list[int], context: int,
                 steps: int, compile: bool = False) -> list[dict]:
    tok = factory.tokenizer
    text = " ".join(["The history of the river valley is long and full of small stories."] * (context // 4))
    prompt = token_windows(tok, text, context, 1)[0]
    hf, ours_state, hf_state = None, {}, {}
    rows = []
    for b in batches:
        progress(f"batch {b}: lessserve {policy} ...")
        ours = bench_engine(factory, policy, budget, b, context, steps, prompt, ours_state)
        if hf is None:
            hf = load_transformers(factory.ckpt.folder, getattr(torch, ours["dtype"]), factory.device)
        progress(f"batch {b}: transformers full cache ...")
        ref = bench_transformers(hf, b, context, steps, prompt, factory.device, hf_state)
        ours["speedup_vs_transformers"] = ours["tokens_per_s"] / ref["tokens_per_s"]
        ours["cache_ratio_vs_transformers"] = ref["cache_bytes_per_session"] / ours["cache_bytes_per_session"]
        rows += [ours, ref]
        if compile:
            progress(f"batch {b}: lessserve {policy} + torch.compile (compiling) ...")
            comp = bench_compiled(factory, policy, budget, b, context, steps, prompt, ours_state)
            comp["speedup_vs_transformers"] = comp["tokens_per_s"] / ref["tokens_per_s"]
            comp["speedup_vs_eager"] = comp["tokens_per_s"] / ours["tokens_per_s"]
            rows.append(comp)
    return rows


def run_decode(engine: EngineConfig, batches: list[int], context: int, steps: int, threads: int = 0,
               compile: bool = False) -> BenchResult:
    """`lessserve bench decode`: the engine's policy against transformers' full cache, per batch."""
    if threads:
        torch.set_num_threads(threads)
    factory = EngineFactory(engine.model_copy(update={"max_context": context + steps + 8, "prefill_chunk": 256}))
    rows = bench_decode(factory, engine.policy, engine.budget, batches, context, steps, compile)
    dev = factory.device
    note = " (CPU figures are ratios only; absolute times need a GPU)" if dev.type == "cpu" else ""
    meta = {"device": f"{dev}{note}", "torch threads": torch.get_num_threads(),
            "prefill_chunk": factory.base.prefill_chunk}
    return BenchResult("decode", rows, meta,
                       plot=Plot("batch", "tokens_per_s", "system", f"decode tokens/s, context {context}"))
