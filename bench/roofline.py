"""Static roofline of the Triton kernels: bytes each call must move, from the shapes alone, and the
time that takes at a given memory bandwidth - the prediction a first GPU run is compared against.

Per call (one layer, `n` slots each holding a full budget of `B` cached tokens, rank-R LESS state):
  decode / chunk attention: read K and V of the cache, q / k_new / v_new, H, z, phi; write the
    output and the per-key masses. `scratch` adds what the implementation moves on top (the fused
    path's fp32 logits written and read back; the unfused path's m / l and second K read).
  evict (h2o): select reads scores and masses; move reads every merged row (cache + new) and
    rewrites every kept row in place (as implemented), victims out; absorb updates H / z.
  pack (int8): read K, V, pos, score, H, z; write int8 codes + fp32 scales + the fp32 / int32 sections.
Programs (from kernels/triton/launch.py's grid) against the GPU's SM count show when a launch
cannot fill the device (decode: one program per slot and KV head).
"""

from __future__ import annotations

from lessserve.bench.result import BenchResult
from lessserve.kernels.triton.launch import attention_launches, evict_launches, quant_launch

# name -> (query heads, KV heads, head_dim, layers)
SHAPES = {"llama2-7b": (32, 32, 128, 32), "llama3-8b": (32, 8, 128, 32), "smollm2-135m": (9, 3, 64, 30)}
KERNELS = ("decode", "chunk", "evict", "pack")
RANK, CHUNK, ISZ = 8, 64, 2  # LESS rank, prefill chunk, bf16 bytes
LAUNCH_S = 5e-6  # a kernel launch plus its first loads: below this a call is latency-bound
GPUS = {"h200": (4800e9, 132), "h100": (3350e9, 132), "a100": (2039e9, 108)}  # datasheet HBM bytes/s, SMs


def _programs(launches) -> int:
    total = 0
    for x in launches:
        p = 1
        for g in x.grid:
            p *= g
        total = max(total, p)
    return total


def attention_bytes(n: int, Hq: int, Hkv: int, D: int, B: int, C: int, R: int = RANK, isz: int = ISZ) -> dict:
    G = Hq // Hkv
    read = (2 * n * Hkv * B * D * isz  # K, V of the cache
            + n * Hq * C * D * isz + 2 * n * Hkv * C * D * isz  # q, k_new, v_new
            + n * Hkv * (R * D + R) * 4 + n * Hq * C * R * 4)  # H, z, phi
    written = n * Hq * C * D * isz + n * Hkv * (B + C) * 4  # out, masses
    if G * C <= 64:  # fused: logits [n, Hkv, G*C, B+C] fp32 written, read back
        scratch = 2 * n * Hkv * G * C * (B + C) * 4
    else:  # m / l written and read, K (cache + new) read a second time by the mass kernel
        scratch = 4 * n * Hkv * G * C * 4 + n * Hkv * (B + C) * D * isz
    return {"read": read, "written": written, "scratch": scratch}


def evict_bytes(n: int, Hkv: int, D: int, B: int, C: int, R: int = RANK, isz: int = ISZ) -> dict:
    rows = B + C  # merged entries
    kept = min(rows, B)
    select = n * Hkv * (2 * B * 4 + C * 4)  # scores + masses read
    move_read = n * Hkv * (rows * (2 * D * isz + 8) + B * 4)  # k, v, pos, score per merged row + mass
    move_write = n * Hkv * (kept * (2 * D * isz + 8) + C * (2 * D * isz + 4))  # kept rows + victims
    state = n * Hkv * (R * D + R) * 4  # H, z: read and written by absorb
    absorb_read = n * Hkv * C * (R * 4 + D * isz) + state  # f, victim values, H, z
    code = 2 * n * Hkv * rows * 4  # selection codes written, read
    return {"read": select + move_read + absorb_read, "written": move_write + state, "scratch": code}


def pack_bytes(n: int, Hkv: int, D: int, B: int, R: int = RANK, isz: int = ISZ) -> dict:
    kv = 2 * n * Hkv * B * D
    other = n * Hkv * (B * 8 + (R * D + R) * 4)  # pos, score, H, z
    return {"read": kv * isz + other, "written": kv + 2 * n * Hkv * B * 4 + other, "scratch": 0}


def plan_row(kernel: str, model: str, n: int, B: int, bw: float, sms: int) -> dict:
    Hq, Hkv, D, layers = SHAPES[model]
    if kernel in ("decode", "chunk"):
        C = 1 if kernel == "decode" else CHUNK
        b = attention_bytes(n, Hq, Hkv, D, B, C)
        progs = _programs(attention_launches(n, Hq, Hkv, C, B, D, RANK, "bf16", True))
    elif kernel == "evict":
        b = evict_bytes(n, Hkv, D, B, 1)
        progs = _programs(evict_launches(n, Hkv, B, 1, D, RANK, "h2o", "bf16", True))
    else:
        b = pack_bytes(n, Hkv, D, B)
        progs = _programs([quant_launch("quantize", n, Hkv * B, 1, D, "bf16")])
    need = b["read"] + b["written"]
    moved = need + b["scratch"]
    return {"kernel": kernel, "model": model, "batch": n, "budget": B, "read_MB": b["read"] / 1e6,
            "written_MB": b["written"] / 1e6, "scratch_MB": b["scratch"] / 1e6, "t_min_us": need / bw * 1e6,
            "t_impl_us": moved / bw * 1e6, "per_step_us": moved / bw * 1e6 * layers, "programs": progs,
            "waves": progs / sms, "bound": "bandwidth" if progs >= sms and moved / bw > LAUNCH_S else "latency"}


def run_plan(kernels: list[str], models: list[str], batches: list[int], budgets: list[int], gpu: str,
             bandwidth: float | None = None) -> BenchResult:
    """Every (model, batch, budget, kernel) row at `bandwidth` bytes/s (default: the GPU's datasheet)."""
    bw_sheet, sms = GPUS[gpu]
    bw = bandwidth or bw_sheet
    rows = [plan_row(k, m, n, B, bw, sms) for m in models for n in batches for B in budgets for k in kernels]
    meta = {"plan": "static roofline, no measurement", "gpu": gpu, "bandwidth_GB_s": round(bw / 1e9),
            "SMs": sms, "dtype": "bfloat16", "LESS rank": RANK, "chunk": CHUNK}
    notes = ["t_min_us: (read + written) / bandwidth; t_impl_us adds the scratch traffic as implemented; "
             "per_step_us = t_impl_us x the model's layers (one decode step's share of this kernel).",
             "waves = programs / SMs; bound = latency when the grid cannot fill the SMs or the call moves less "
             "than ~5 us of bytes (expect ~5 us, not t_impl_us, there). Goal: >= 70% of copy bandwidth at "
             "batch >= 32."]
    return BenchResult("kernels-plan", rows, meta, notes=notes)
