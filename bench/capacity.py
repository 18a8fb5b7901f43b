"""`lessserve bench capacity`: capacity on paper, from the slab's own byte accounting.

Bytes per session come from `SlotSlab.slot_bytes()` of a slab built on the meta device with the
model's shapes (nothing is allocated), so they are exactly what a worker would reserve. From them:
sessions per GPU (HBM less the bf16 weights and a workspace share), and for a fleet holding N
conversations: GPUs to keep a share of them resident, Redis memory for the rest, and the Redis
egress that restoring them at a given turn rate needs - beside the same figures for full-KV caching
at a given mean context. Every input is a flag; the defaults are written in docs/capacity.md.
"""

from __future__ import annotations

import math

import torch

from lessserve.bench.result import BenchResult
from lessserve.workers.slots import SlotSlab

# name -> (layers, KV heads, head_dim, parameters)
SHAPES = {"llama2-7b": (32, 32, 128, 6.74e9), "llama3-8b": (32, 8, 128, 8.03e9)}
GPUS = {"h100": 80e9, "h200": 141e9}  # HBM bytes


def slot_bytes(layers: int, kv_heads: int, head_dim: int, budget: int, rank: int, dtype=torch.bfloat16) -> int:
    """One compressed session slot (k, v in dtype; pos, score, H, z, length as the slab keeps them)."""
    return SlotSlab(layers, kv_heads, head_dim, 1, budget, rank, torch.device("meta"), dtype).slot_bytes()


def full_token_bytes(layers: int, kv_heads: int, head_dim: int, isz: int = 2) -> int:
    return 2 * layers * kv_heads * head_dim * isz


def run_capacity(models: list[str], budgets: list[int], rank: int, contexts: list[int], conversations: int,
                 resident_share: float, turn_interval_s: float, workspace_share: float,
                 redis_node_bytes: float, redis_node_bw: float) -> BenchResult:
    rows = []
    turns_per_s = conversations / turn_interval_s
    for m in models:
        L, Hkv, D, params = SHAPES[m]
        weights = 2 * params
        designs = [(f"LESS slot B={b}", slot_bytes(L, Hkv, D, b, rank)) for b in budgets]
        designs += [(f"full KV, {c} tokens", c * full_token_bytes(L, Hkv, D)) for c in contexts]
        for name, per in designs:
            row = {"model": m, "design": name, "MB_per_session": per / 1e6}
            for g, hbm in GPUS.items():
                row[f"sessions_per_{g}"] = int((hbm * (1 - workspace_share) - weights) // per)
            resident = conversations * resident_share
            row["h200_for_resident"] = math.ceil(resident / max(row["sessions_per_h200"], 1))
            row["redis_TB"] = conversations * per / 1e12
            row["redis_nodes_memory"] = math.ceil(conversations * per / redis_node_bytes)
            egress = turns_per_s * (1 - resident_share) * per  # every non-resident turn restores once
            row["restore_GB_s"] = egress / 1e9
            row["redis_nodes_bandwidth"] = math.ceil(egress / redis_node_bw)
            row["restores_per_s_per_node"] = redis_node_bw / per
            rows.append(row)
    meta = {"conversations": conversations, "resident share": resident_share,
            "turn every s": turn_interval_s, "workspace share of HBM": workspace_share,
            "Redis node GB": redis_node_bytes / 1e9, "Redis node GB/s": redis_node_bw / 1e9, "LESS rank": rank,
            "dtype": "bfloat16 k/v (pos int32, score / H / z fp32)"}
    return BenchResult("capacity", rows, meta)
