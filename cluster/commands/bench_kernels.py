"""`lessserve bench kernels`: time the compressed-attention, evict and pack kernels per shape.

Per row: kernel, model shape, batch, budget, median time (device events on CUDA, warm-up first,
inputs rotated across several copies so caches do not flatter), achieved bytes/s against the
measured device-to-device copy bandwidth, and speed-up against the torch reference and against
`F.scaled_dot_product_attention` over a full cache of the context the session stands for.
Without a CUDA GPU it times the torch reference path on a small shape subset and says so.
"""

from __future__ import annotations

import math
import statistics
import time

from lessserve.cluster.commands.common import CliError, parse_ints

# name -> (query heads, KV heads, head_dim)
MODELS = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}
KERNELS = ("decode", "chunk", "evict", "pack")
RANK, CHUNK, ROTATE_BYTES = 8, 64, 256 << 20


def register(bsub) -> None:
    p = bsub.add_parser("kernels", help="Triton kernels vs torch reference vs full-cache SDPA")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"subset of {','.join(KERNELS)}")
    p.add_argument("--models", default=None, help=f"subset of {','.join(MODELS)} (default: all on GPU)")
    p.add_argument("--batches", default=None, help="slots per call (default 1,8,32,128 on GPU; 1,4 on CPU)")
    p.add_argument("--budgets", default=None, help="cached tokens per head (default 128,512,2048; 128 on CPU)")
    p.add_argument("--context", type=int, default=4096, help="tokens the session represents (SDPA baseline)")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def _names(flag: str, value: str, allowed) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise CliError(flag, f"unknown {bad or value!r}; expected a subset of {','.join(allowed)}")
    return names


def run(args) -> int:
    import torch

    from lessserve.workers.report import markdown_table, progress, write_json

    gpu = torch.cuda.is_available()
    kernels = _names("--kernels", args.kernels, KERNELS)
    models = _names("--models", args.models or (",".join(MODELS) if gpu else "smollm2-135m"), MODELS)
    batches = parse_ints("--batches", args.batches or ("1,8,32,128" if gpu else "1,4"), lo=1, hi=4096)
    budgets = parse_ints("--budgets", args.budgets or ("128,512,2048" if gpu else "128"), lo=16, hi=65536)
    if not 16 <= args.context <= 1 << 20:
        raise CliError("--context", "must be in [16, 1048576]")
    if not (1 <= args.iters <= 100_000 and 0 <= args.warmup <= 100_000):
        raise CliError("--iters", "iters in [1, 100000], warmup in [0, 100000]")
    dev = torch.device("cuda" if gpu else "cpu")
    dtype = getattr(torch, args.dtype) if gpu else torch.float32
    if gpu:
        print(f"device: {torch.cuda.get_device_name(dev)}; dtype {args.dtype}")
    else:
        print("device: cpu - NO CUDA GPU: timing the torch reference path only, on a small shape subset. "
              "Triton times, bandwidth figures and speed-ups are NOT measured (they need a GPU).")
    timer = Timer(dev, args.warmup, args.iters)
    copy_bw = timer.copy_bandwidth() if gpu else None
    if copy_bw:
        print(f"measured device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    rows = []
    for model in models:
        for n in batches:
            for B in budgets:
                for k in kernels:
                    progress(f"bench kernels: {k} {model} n={n} B={B}")
                    rows.append(bench_row(k, model, n, B, args.context, dtype, dev, timer, copy_bw, gpu))
    print(markdown_table(rows))
    write_json(args.json, rows)
    return 0


class Timer:
    """Median of `iters` timed calls after `warmup`; CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, dev, warmup: int, iters: int):
        self.dev, self.warmup, self.iters = dev, warmup, iters

    def __call__(self, fns: list) -> float:
        """fns: one closure per rotated input copy. Returns seconds per call."""
        import torch

        for i in range(self.warmup):
            fns[i % len(fns)]()
        times = []
        for i in range(self.iters):
            fn = fns[i % len(fns)]
            if self.dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    def copy_bandwidth(self) -> float:
        """Bytes/s of a device-to-device copy (read + write counted)."""
        import torch

        x = torch.empty(ROTATE_BYTES * 4, dtype=torch.uint8, device=self.dev)
        y = torch.empty_like(x)
        return 2 * x.numel() / self([lambda: y.copy_(x)])


def _inputs(kernel: str, Hq: int, Hkv: int, D: int, n: int, B: int, dtype, dev):
    """One input set; returns (kwargs for the op, bytes the op must move at least)."""
    import torch

    from lessserve.kernels.reference.evict import EvictionSpec
    from lessserve.kernels.reference.lowrank import LessLayerWeights

    isz = torch.empty((), dtype=dtype).element_size()
    C = 1 if kernel in ("decode", "evict") else CHUNK
    kc = torch.randn(n, Hkv, B, D, device=dev, dtype=dtype)
    vc = torch.randn(n, Hkv, B, D, device=dev, dtype=dtype)
    length = torch.full((n,), B if kernel == "evict" else B - C, dtype=torch.int32, device=dev)
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
    if kernel == "evict":
        r = lambda *s: torch.randn(*s, device=dev) / s[-2] ** 0.5  # noqa: E731
        w = LessLayerWeights(r(Hq, D, 64), r(Hq, 64, RANK), r(Hkv, D, 64), r(Hkv, 64, RANK), r(Hkv, RANK, RANK),
                             torch.ones(Hkv, RANK, device=dev), torch.ones(Hkv, RANK, device=dev))
        pos = torch.arange(B, dtype=torch.int32, device=dev).expand(n, Hkv, B).contiguous()
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

    return {"decode": ops.decode_attention, "chunk": ops.chunk_attention, "evict": ops.evict_absorb,
            "pack": ops.pack_slots}[kernel]


def _sdpa_fns(Hq: int, Hkv: int, D: int, n: int, ctx: int, C: int, dtype, dev, copies: int) -> list:
    import torch
    import torch.nn.functional as F

    fns = []
    for _ in range(copies):
        q = torch.randn(n, Hq, C, D, device=dev, dtype=dtype)
        k = torch.randn(n, Hkv, ctx, D, device=dev, dtype=dtype)
        v = torch.randn(n, Hkv, ctx, D, device=dev, dtype=dtype)
        fns.append(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv))
    return fns


def bench_row(kernel: str, model: str, n: int, B: int, ctx: int, dtype, dev, timer: Timer, copy_bw, gpu: bool):
    import torch

    Hq, Hkv, D = MODELS[model]
    row = {"kernel": kernel, "model": model, "shape": f"{Hq}q/{Hkv}kv x{D}", "batch": n, "budget": B}
    try:
        first, need = _inputs(kernel, Hq, Hkv, D, n, B, dtype, dev)
        copies = max(1, min(4, math.ceil(ROTATE_BYTES / need))) if gpu else 1
        sets = [first] + [_inputs(kernel, Hq, Hkv, D, n, B, dtype, dev)[0] for _ in range(copies - 1)]
        op = _op(kernel)
        t_ref = timer([lambda a=a: op(*a, impl="torch") for a in sets])
        row["torch_us"] = t_ref * 1e6
        if gpu:
            t = timer([lambda a=a: op(*a, impl="triton") for a in sets])
            row["triton_us"] = t * 1e6
            row["GB_s"] = need / t / 1e9
            row["pct_copy_bw"] = 100 * need / t / copy_bw
            row["x_vs_torch"] = t_ref / t
        else:
            row["triton_us"] = "not measured (no GPU)"
        if kernel in ("decode", "chunk"):
            C = 1 if kernel == "decode" else CHUNK
            t_sdpa = timer(_sdpa_fns(Hq, Hkv, D, n, ctx, C, dtype, dev, copies))
            row["sdpa_full_us"] = t_sdpa * 1e6
            if gpu:
                row["x_vs_sdpa_full"] = t_sdpa / row["triton_us"] * 1e6
    except torch.OutOfMemoryError:
        row["torch_us"] = "out of memory"
        torch.cuda.empty_cache()
    return row
