"""`lessserve bench kernels`: time the compressed-attention, evict and pack kernels per shape.

Per row: kernel, model shape, batch, budget, median time (device events on CUDA, warm-up first,
inputs rotated across several copies so caches do not flatter), achieved bytes/s against the
measured device-to-device copy bandwidth, and speed-up against the torch reference
(kernels/reference/, the spec) and against fair SDPA baselines:
- decode: `sdpa_B_less_us`, SDPA over the same compacted B-token cache plus the LESS term's two
  matmuls (what a compressed cache costs with a stock attention kernel), and `sdpa_full_us`, SDPA
  over a full cache of the context the session stands for;
- step (one layer of a decode step: attend + evict-and-absorb, `ops.attend_evict`): against
  `sdpa_append_us`, SDPA over the full context plus appending the token to a static full cache.
Without a CUDA GPU it times the torch paths (`torch_us`: the fast path, `reference_us`: the
reference) on a small shape subset and says so.
"""

from __future__ import annotations

import math

import torch

from lessserve.bench.result import BenchResult
from lessserve.bench.timer import Timer
from lessserve.lab.output import progress

# name -> (query heads, KV heads, head_dim)
MODELS = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}
KERNELS = ("decode", "chunk", "evict", "step", "pack")
RANK, CHUNK, ROTATE_BYTES = 8, 64, 256 << 20


def run_kernels(kernels: list[str], models: list[str], batches: list[int], budgets: list[int], context: int,
                dtype_name: str, warmup: int, iters: int) -> BenchResult:
    """Every (model, batch, budget, kernel) row. Without CUDA only the torch path is timed, in fp32."""
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    dtype = getattr(torch, dtype_name) if gpu else torch.float32
    if gpu:
        meta = {"device": torch.cuda.get_device_name(dev), "dtype": dtype_name}
    else:
        meta = {"device": "cpu - NO CUDA GPU: timing the torch paths only (fast path and reference), on a small "
                          "shape subset. Triton times and bandwidth figures are NOT measured (they need a GPU)",
                "torch threads": torch.get_num_threads()}
    timer = Timer(dev, warmup, iters)
    copy_bw = timer.copy_bandwidth(ROTATE_BYTES * 4) if gpu else None
    if copy_bw:
        meta["copy_bandwidth_GB_s"] = round(copy_bw / 1e9)
    rows = []
    for model in models:
        for n in batches:
            for B in budgets:
                for k in kernels:
                    progress(f"bench kernels: {k} {model} n={n} B={B}")
                    rows.append(bench_row(k, model, n, B, context, dtype, dev, timer, copy_bw, gpu))
    return BenchResult("kernels", rows, meta)


def _inputs(kernel: str, Hq: int, Hkv: int, D: int, n: int, B: int, dtype, dev):
    """One input set; returns (kwargs for the op, bytes the op must move at least)."""
    from lessserve.kernels.reference.evict import EvictionSpec
    from lessserve.kernels.reference.lowrank import LessLayerWeights

    isz = torch.empty((), dtype=dtype).element_size()
    C = 1 if kernel in ("decode", "evict", "step") else CHUNK
    kc = torch.randn(n, Hkv, B, D, device=dev, dtype=dtype)
    vc = torch.randn(n, Hkv, B, D, device=dev, dtype=dtype)
    length = torch.full((n,), B if kernel in ("evict", "step") else B - C, dtype=torch.int32, device=dev)
    slot_ids = torch.randperm(n, device=dev)
    kv_bytes = 2 * n * Hkv * B * D * isz
    H = torch.rand(n, Hkv, RANK, D, device=dev)
    z = torch.rand(n, Hkv, RANK, device=dev)
    if kernel in ("decode", "chunk"):
        q = torch.randn(n, Hq, C, D, device=dev, dtype=dtype)
        kn = torch.randn(n, Hkv, C, D, device=dev, dtype=dtype)
        vn = torch.randn(n, Hkv, C, D, device=dev, dtype=dtype)
        phi = torch.rand(n, Hq, C, RANK, device=dev)
        if kernel == "decode":
            q, kn, vn, phi = q[:, :, 0], kn[:, :, 0], vn[:, :, 0], phi[:, :, 0]
        args = (q, kn, vn, kc, vc, length, slot_ids, D**-0.5, H, z, phi)
        return args, kv_bytes + 2 * q.numel() * isz + n * Hkv * (B + C) * 4
    if kernel in ("evict", "step"):
        r = lambda *s: torch.randn(*s, device=dev) / s[-2] ** 0.5  # noqa: E731
        w = LessLayerWeights(r(Hq, D, 64), r(Hq, 64, RANK), r(Hkv, D, 64), r(Hkv, 64, RANK), r(Hkv, RANK, RANK),
                             torch.ones(Hkv, RANK, device=dev), torch.ones(Hkv, RANK, device=dev))
        pos = torch.arange(B, dtype=torch.int32, device=dev).expand(n, Hkv, B).contiguous()
    if kernel == "step":  # one layer of a decode step over full slots: attention, then eviction
        q = torch.randn(n, Hq, 1, D, device=dev, dtype=dtype)
        kn, vn = (torch.randn(n, Hkv, 1, D, device=dev, dtype=dtype) for _ in range(2))
        args = (q, kn, vn, kc, vc, pos, torch.rand(n, Hkv, B, device=dev), length, slot_ids,
                torch.full((n, 1), B, device=dev), D**-0.5, EvictionSpec("h2o", B, B // 2))
        return (args, {"H": H, "z": z, "phi_q": torch.rand(n, Hq, 1, RANK, device=dev), "psi": w}), \
            2 * kv_bytes + n * Hkv * B * 16
    if kernel == "evict":
        args = (kc, vc, pos, torch.rand(n, Hkv, B, device=dev), length, slot_ids,
                torch.randn(n, Hkv, 1, D, device=dev, dtype=dtype), torch.randn(n, Hkv, 1, D, device=dev, dtype=dtype),
                torch.full((n, 1), B, device=dev), torch.rand(n, Hkv, B, device=dev), torch.rand(n, Hkv, 1, device=dev),
                EvictionSpec("h2o", B, B // 2), H, z, w)
        return args, 2 * kv_bytes + n * Hkv * B * 16  # worst case: every row moves
    # pack: one layer of n slots, int8
    slab = (kc[None], vc[None], torch.zeros(1, n, Hkv, B, dtype=torch.int32, device=dev),
            torch.rand(1, n, Hkv, B, device=dev), H[None], z[None], length)
    return slab + (slot_ids, "int8"), kv_bytes + kv_bytes // isz + n * Hkv * B * 16


def _op(kernel: str):
    from lessserve.kernels import ops

    if kernel == "step":
        return lambda a, impl: ops.attend_evict(*a[0], **a[1], impl=impl)
    f = {"decode": ops.decode_attention, "chunk": ops.chunk_attention, "evict": ops.evict_absorb,
         "pack": ops.pack_slots}[kernel]
    return lambda a, impl: f(*a, impl=impl)


def _reference(kernel: str):
    """The spec (kernels/reference/) of each op; None where there is no separate one."""
    from lessserve.kernels.reference.attention import chunk_attention_ref, decode_attention_ref
    from lessserve.kernels.reference.evict import evict_absorb_ref

    if kernel == "step":
        def step(a):
            (q, kn, vn, kc, vc, pc, sc, ln, sid, pn, scale, spec), kw = a
            o, mc, mn = (decode_attention_ref(q[:, :, 0], kn[:, :, 0], vn[:, :, 0], kc, vc, ln, sid, scale, kw["H"],
                                              kw["z"], kw["phi_q"][:, :, 0]))
            return o, evict_absorb_ref(kc, vc, pc, sc, ln, sid, kn, vn, pn, mc, mn[..., None], spec, kw["H"], kw["z"],
                                       kw["psi"])
        return step
    f = {"decode": decode_attention_ref, "chunk": chunk_attention_ref, "evict": evict_absorb_ref}.get(kernel)
    return None if f is None else (lambda a: f(*a))


def _sdpa_fns(Hq: int, Hkv: int, D: int, n: int, ctx: int, C: int, dtype, dev, copies: int,
              less: bool = False) -> list:
    """SDPA of C queries over a ctx-token cache; `less`: plus the LESS term's phi^T H and phi^T z."""
    import torch.nn.functional as F

    fns = []
    for _ in range(copies):
        q = torch.randn(n, Hq, C, D, device=dev, dtype=dtype)
        k = torch.randn(n, Hkv, ctx, D, device=dev, dtype=dtype)
        v = torch.randn(n, Hkv, ctx, D, device=dev, dtype=dtype)
        G = Hq // Hkv
        H, z = torch.rand(n, Hkv, 1, RANK, D, device=dev), torch.rand(n, Hkv, 1, RANK, 1, device=dev)
        phi = torch.rand(n, Hkv, G, C, RANK, device=dev)

        def f(q=q, k=k, v=v, H=H, z=z, phi=phi):
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)
            if less:
                o = o + (torch.matmul(phi, H) / torch.matmul(phi, z)).view(n, Hq, C, D).to(o.dtype)
            return o
        fns.append(f)
    return fns


def _sdpa_append_fns(Hq: int, Hkv: int, D: int, n: int, ctx: int, dtype, dev, copies: int) -> list:
    """One layer of a full-cache decode step: write the token into a static cache, SDPA over it."""
    import torch.nn.functional as F

    fns = []
    for _ in range(copies):
        q = torch.randn(n, Hq, 1, D, device=dev, dtype=dtype)
        k = torch.randn(n, Hkv, ctx, D, device=dev, dtype=dtype)
        v = torch.randn(n, Hkv, ctx, D, device=dev, dtype=dtype)
        kn, vn = torch.randn(n, Hkv, 1, D, device=dev, dtype=dtype), torch.randn(n, Hkv, 1, D, device=dev, dtype=dtype)
        at = torch.tensor([ctx - 1], device=dev)

        def f(q=q, k=k, v=v, kn=kn, vn=vn, at=at):
            k.index_copy_(2, at, kn)
            v.index_copy_(2, at, vn)
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)
        fns.append(f)
    return fns


def bench_row(kernel: str, model: str, n: int, B: int, ctx: int, dtype, dev, timer: Timer, copy_bw, gpu: bool):
    Hq, Hkv, D = MODELS[model]
    row = {"kernel": kernel, "model": model, "shape": f"{Hq}q/{Hkv}kv x{D}", "batch": n, "budget": B}
    try:
        first, need = _inputs(kernel, Hq, Hkv, D, n, B, dtype, dev)
        copies = max(1, min(4, math.ceil(ROTATE_BYTES / need))) if gpu else 1
        sets = [first] + [_inputs(kernel, Hq, Hkv, D, n, B, dtype, dev)[0] for _ in range(copies - 1)]
        op = _op(kernel)
        t_ref = timer([lambda a=a: op(a, impl="torch") for a in sets])
        row["torch_us"] = t_ref * 1e6
        if (ref := _reference(kernel)) is not None:
            row["reference_us"] = timer([lambda a=a: ref(a) for a in sets]) * 1e6
            row["torch_x_vs_reference"] = row["reference_us"] / row["torch_us"]
        if gpu:
            t = timer([lambda a=a: op(a, impl="triton") for a in sets])
            row["triton_us"] = t * 1e6
            row["GB_s"] = need / t / 1e9
            row["pct_copy_bw"] = 100 * need / t / copy_bw
            row["x_vs_torch"] = t_ref / t
        else:
            row["triton_us"] = "not measured (no GPU)"
        best = row["triton_us"] / 1e6 if gpu else t_ref  # the path the engine runs on this device
        if kernel in ("decode", "chunk"):
            C = 1 if kernel == "decode" else CHUNK
            t_sdpa = timer(_sdpa_fns(Hq, Hkv, D, n, ctx, C, dtype, dev, copies))
            row["sdpa_full_us"] = t_sdpa * 1e6
            row["x_vs_sdpa_full"] = t_sdpa / best
        if kernel == "decode":
            t_b = timer(_sdpa_fns(Hq, Hkv, D, n, B, 1, dtype, dev, copies, less=True))
            row["sdpa_B_less_us"] = t_b * 1e6
            row["x_vs_sdpa_B_less"] = t_b / best
        if kernel == "step":
            t_a = timer(_sdpa_append_fns(Hq, Hkv, D, n, ctx, dtype, dev, copies))
            row["sdpa_append_us"] = t_a * 1e6
            row["x_vs_sdpa_append"] = t_a / best
    except torch.OutOfMemoryError:
        row["torch_us"] = "out of memory"
        torch.cuda.empty_cache()
    return row
