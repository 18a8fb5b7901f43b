"""Decode steps and a multi-turn chat load on random-weight engines of 7B / 8B / default shapes: the
GPU run's `bench decode` and `bench serve` where no checkpoint, tokenizer or Ray can be carried.

decode: per (model, kernels, cuda_graphs, batch) the median decode step of `batch` sessions that
  each hold `context` tokens compressed to the budget (one real prefill, copied to every slot).
serve: `users` sessions talk `turns` turns each through the worker's BatchScheduler (continuous
  batching, prefill chunks interleaved with batched decode): turns/s, TTFT and inter-token latency.
recall: a turn's TTFT with and without the `+recall` round after histories of each length (issue 27's
  GPU part: 4k / 16k / 32k on 8B shapes), and the round's page scoring within it (bench/recall.py).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator

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


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _random_model(name: str, dev: torch.device):
    """Random weights of `name`'s shape in the dtype the engines run on `dev` (bf16 on CUDA, fp32 here)."""
    return random_model(model_args(name), dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)


def _engines(what: str, models: list[str], policy: str, budget: int, max_slots: int, **cfg) -> Iterator:
    """(model name, engine) for every model x compared configuration; one random model per shape."""
    dev = _device()
    for name in models:
        model = _random_model(name, dev)
        for kernels, graphs in _configs(dev.type == "cuda"):
            progress(f"{what}: {name} kernels={kernels} cuda_graphs={graphs}")
            yield name, random_engine(name, EngineConfig(policy=policy, budget=budget, max_slots=max_slots,
                                                         kernels=kernels, cuda_graphs=graphs, **cfg), model)
            _empty_cache()
        del model
        _empty_cache()


def _meta(policy: str, budget: int, **more) -> dict:
    dev = _device()
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (no CUDA GPU)",
            "policy": policy, "budget": budget, "weights": "random (shapes only)", **more}


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
    rows = []
    for name, e in _engines("decode", models, policy, budget, max(batches), prefill_chunk=64):
        rows += _decode_rows(e, name, batches, context, steps, _device())
    return BenchResult("decode-random", rows, _meta(policy, budget))


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


@torch.inference_mode()
def run_random_recall(models: list[str], lengths: list[int], turn_tokens: tuple[int, ...] = (13, 269),
                      repeats: int = 3, budget: int = 128) -> BenchResult:
    """h2o+recall against h2o on one random model per shape: random token ids for the history and the
    turns (what is timed does not depend on them), `bench/recall.py`'s alternating TTFT repeats."""
    from lessserve.bench.recall import ttft_rows

    dev, rows = _device(), []
    for name in models:
        args = model_args(name)
        model = _random_model(name, dev)
        room = max(lengths) + max(turn_tokens) + 64
        cfg = dict(budget=budget, max_slots=2, max_context=room, max_model_len=room,
                   history_bytes=1 << 40)  # every history held: a work copy per repeat doubles the base's
        with_recall = random_engine(name, EngineConfig(policy="h2o+recall", **cfg), model)
        without = random_engine(name, EngineConfig(policy="h2o", **cfg), model)
        g = torch.Generator().manual_seed(0)
        history = torch.randint(args.vocab_size, (max(lengths),), generator=g).tolist()
        turns = [torch.randint(args.vocab_size, (n,), generator=g).tolist() for n in turn_tokens]
        progress(f"recall: {name}, histories {lengths}, turns of {list(turn_tokens)} tokens")
        rows += [dict(r, model=name) for r in ttft_rows(with_recall, without, history, sorted(lengths), turns,
                                                         repeats)]
        del with_recall, without, model
        _empty_cache()
    cols = ["model", "policy", "history", "turn_tokens", "ttft_ms", "ttft_ms_min", "x_without", "score_ms",
            "repeats"]
    return BenchResult("recall-random", rows, _meta("h2o+recall", budget, lengths=lengths), columns=cols)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@torch.inference_mode()
def run_random_serve(models: list[str], users: int, turns: int, new_tokens: int, max_tokens: int,
                     policy: str = "h2o+less", budget: int = 128) -> BenchResult:
    rows = []
    for name, e in _engines(f"serve ({users} users x {turns} turns)", models, policy, budget, users):
        rows.append({"model": name, "kernels": e.cfg.kernels, "cuda_graphs": e.cfg.cuda_graphs, "users": users,
                     **_serve_load(e, users, turns, new_tokens, max_tokens)})
    return BenchResult("serve-random", rows, _meta(policy, budget, new_tokens_per_turn=new_tokens,
                                                   reply_tokens=max_tokens))


def _serve_load(e, users: int, turns: int, new_tokens: int, max_tokens: int) -> dict:
    from lessserve.workers.scheduler import BatchScheduler

    sched = BatchScheduler(e, max_batch=users)
    slots = [e.alloc() for _ in range(users)]
    res: list[dict] = []

    async def load():
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
    return {"turns": len(res), "turns_per_s": len(res) / wall, "tokens_per_s": sum(r["tokens"] for r in res) / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": _pct(ttft, 0.99), "itl_p50_s": _pct(itl, 0.5),
            "itl_p99_s": _pct(itl, 0.99)}
