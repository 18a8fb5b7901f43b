"""Decode steps and a multi-turn chat load on random-weight engines of 7B / 8B / default shapes: the
GPU run's `bench decode` and `bench serve` where no checkpoint, tokenizer or Ray can be carried.

decode: per (model, kernels, cuda_graphs, batch) the median decode step of `batch` sessions that
  each hold `context` tokens compressed to the budget (one real prefill, copied to every slot).
serve: `users` sessions talk `turns` turns each through the worker's BatchScheduler (continuous
  batching, prefill chunks interleaved with batched decode): turns/s, TTFT and inter-token latency.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import torch

from lessserve.bench.random_models import model_args, random_engine, random_model
from lessserve.bench.result import BenchResult
from lessserve.bench.timer import Timer
from lessserve.lab.output import progress
from lessserve.workers.config import EngineConfig


def _configs(gpu: bool) -> list[tuple[str, bool]]:
    """(kernels, cuda_graphs) compared: Triton eager and graphed, the torch reference; torch only on CPU."""
    return [("triton", False), ("triton", True), ("torch", False)] if gpu else [("torch", False)]


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _decode_rows(e, name: str, batches: list[int], context: int, steps: int, dev: torch.device) -> list[dict]:
    slots = [e.alloc() for _ in range(max(batches))]
    e.prefill(slots[0], torch.randint(0, e.args.vocab_size, (context,)).tolist())
    state = e.slab.export(slots[0])
    for s in slots[1:]:
        e.slab.load(s, state)
    timer, rows = Timer(dev, warmup=3, iters=steps), []
    for b in batches:
        dt = timer(lambda b=b: e.decode(slots[:b], [1] * b))
        rows.append({"model": name, "kernels": e.cfg.kernels, "cuda_graphs": e.cfg.cuda_graphs, "batch": b,
                     "context": context, "step_ms": dt * 1e3, "tokens_per_s": b / dt,
                     "graph_fallback": "; ".join(e.graphs.fallback.values()) if e.graphs else ""})
    return rows


@torch.inference_mode()
def run_random_decode(models: list[str], batches: list[int], context: int, steps: int, policy: str = "h2o+less",
                      budget: int = 128) -> BenchResult:
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    rows = []
    for name in models:
        model = random_model(model_args(name), dev, torch.bfloat16 if gpu else torch.float32)
        for kernels, graphs in _configs(gpu):
            progress(f"decode: {name} kernels={kernels} cuda_graphs={graphs}")
            cfg = EngineConfig(policy=policy, budget=budget, max_slots=max(batches), kernels=kernels,
                               cuda_graphs=graphs, prefill_chunk=64)
            rows += _decode_rows(random_engine(name, cfg, model), name, batches, context, steps, dev)
            _empty_cache()
        del model
        _empty_cache()
    meta = {"device": torch.cuda.get_device_name(dev) if gpu else "cpu (no CUDA GPU)", "policy": policy,
            "budget": budget, "weights": "random (shapes only)"}
    return BenchResult("decode-random", rows, meta)


async def _user(sched, slot: int, turns: int, new_tokens: int, max_tokens: int, vocab: int, seed: int,
                out: list[dict]) -> None:
    from lessserve.workers.scheduler import SamplingParams

    g = torch.Generator().manual_seed(seed)
    last: list[int] = []
    for _ in range(turns):
        ids = last + torch.randint(0, vocab, (new_tokens,), generator=g).tolist()
        toks: list[int] = []
        t0 = time.perf_counter()
        stamps = []
        async for _tok in sched.generate(slot, ids, SamplingParams(max_new_tokens=max_tokens), tokens=toks):
            stamps.append(time.perf_counter())
        last = toks[-1:]
        out.append({"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
                    "tokens": len(stamps)})


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@torch.inference_mode()
def run_random_serve(models: list[str], users: int, turns: int, new_tokens: int, max_tokens: int,
                     policy: str = "h2o+less", budget: int = 128) -> BenchResult:
    from lessserve.workers.scheduler import BatchScheduler

    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    rows = []
    for name in models:
        model = random_model(model_args(name), dev, torch.bfloat16 if gpu else torch.float32)
        for kernels, graphs in _configs(gpu):
            progress(f"serve: {name} kernels={kernels} cuda_graphs={graphs}, {users} users x {turns} turns")
            cfg = EngineConfig(policy=policy, budget=budget, max_slots=users, kernels=kernels, cuda_graphs=graphs)
            e = random_engine(name, cfg, model)
            sched = BatchScheduler(e, max_batch=users)
            slots = [e.alloc() for _ in range(users)]
            res: list[dict] = []

            async def load(e=e, sched=sched, slots=slots, res=res):
                await asyncio.gather(*(_user(sched, s, turns, new_tokens, max_tokens, e.args.vocab_size, i, res)
                                       for i, s in enumerate(slots)))

            t0 = time.perf_counter()
            try:
                asyncio.run(load())
            finally:
                sched.close()
            wall = time.perf_counter() - t0
            ttft = [r["ttft"] for r in res]
            itl = [x for r in res for x in r["itl"]]
            rows.append({"model": name, "kernels": kernels, "cuda_graphs": graphs, "users": users, "turns": len(res),
                         "turns_per_s": len(res) / wall, "tokens_per_s": sum(r["tokens"] for r in res) / wall,
                         "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": _pct(ttft, 0.99),
                         "itl_p50_s": _pct(itl, 0.5), "itl_p99_s": _pct(itl, 0.99)})
            del e, sched, load
            _empty_cache()
        del model
        _empty_cache()
    meta = {"device": torch.cuda.get_device_name(dev) if gpu else "cpu (no CUDA GPU)", "policy": policy,
            "budget": budget, "weights": "random (shapes only)", "new tokens per turn": new_tokens,
            "reply tokens": max_tokens}
    return BenchResult("serve-random", rows, meta)
