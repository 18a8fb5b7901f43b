"""Equal bytes per session: a slot's bytes for any capacity, policy and kv_bits (sized on the meta
device, nothing allocated), and the largest budget whose slot fits a byte target. Used by the
evaluations (`eval ppl --equal-bytes`, `eval pareto`) and the benchmarks (`bench decode --equal-bytes`)."""

from __future__ import annotations

import torch

from lessserve.workers.slots import SlotSlab


def slot_bytes_at(engine, capacity: int, kv_bits: str | None = None, rank: int | None = None) -> int:
    """Bytes of one session slot of `engine`'s model and dtype holding `capacity` entries per layer and KV
    head (by default in the engine's kv_bits and LESS rank), sized on the meta device: nothing allocated."""
    a = engine.args
    return SlotSlab(a.num_layers, a.num_kv_heads, a.head_dim, 1, capacity, engine.slab.rank if rank is None else rank,
                    torch.device("meta"), engine.dtype, kv_bits or engine.slab.kv_bits).slot_bytes()


def default_equal_bytes(engine) -> int:
    """The bytes --equal-bytes compares at by default: an h2o slot at budget 128 in the engine's dtype."""
    return slot_bytes_at(engine, 128, "native", 0)


def equal_bytes_budget(engine, nbytes: int) -> int:
    """The largest budget whose slot, in `engine`'s configuration (policy, LESS rank, kv_bits, dtype), takes
    at most `nbytes`: a slot's bytes are linear in its capacity, which is the budget (plus the LESS
    state's tokens for the `+` baselines)."""
    base, per = slot_bytes_at(engine, 0), slot_bytes_at(engine, 1) - slot_bytes_at(engine, 0)
    budget = (nbytes - base) // per - (engine.spec.budget - engine.cfg.budget)
    if budget < 2:
        raise ValueError(f"{engine.policy.name}: {nbytes} bytes hold no slot of budget 2 "
                         f"({base + per * (2 + engine.spec.budget - engine.cfg.budget)} bytes)")
    return int(budget)
