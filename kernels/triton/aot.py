"""Ahead-of-time compile of the Triton kernels for a GPU target, without a GPU.

`compile_launch(launch, cc)` compiles one `Launch` (kernels/triton/launch.py) down to cubin with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` and reads off what a real
compile decides: shared memory (metadata.shared), registers / stack / spills (cuobjdump's resource
usage of the cubin), and the PTX's tensor-core (`mma.sync`, `wgmma.mma_async`) and fp32 FMA counts.

Must run in a process where TRITON_INTERPRET is unset: under the interpreter, triton.language's
own @jit helpers (the reductions' combine functions) are interpreted functions that patch the
language on use, and a real compile then fails. `python -m lessserve.kernels.triton.aot` compiles
a `space()` (full, ci, decode) for sm_80 and sm_90 into one JSON; the tests run it as a child process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

from lessserve.kernels.errors import KernelUnavailableError
from lessserve.kernels.triton.launch import Launch, configuration_space

TARGETS = (80, 90)
# shared memory one block may use (opt-in maximum): sm_80 163 KB of the SM's 164, sm_90 227 KB
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class AotResult:
    label: str
    kernel: str
    cc: int
    ok: bool
    error: str | None = None
    shared: int = 0  # bytes of shared memory per program
    regs: int | None = None  # registers per thread
    stack: int | None = None  # stack frame bytes per thread
    local: int | None = None  # local (spilled) bytes per thread
    mma: int = 0  # PTX mma.sync (sm_80 style tensor cores)
    wgmma: int = 0  # PTX wgmma.mma_async (Hopper warpgroup tensor cores)
    fma: int = 0  # PTX fp32 fma
    num_warps: int = 0
    seconds: float = 0.0


# The default (CI) set, per kernel: (dtype, the constexprs that vary) - a covering subset
_CI_KEY = {
    "attn_fwd_kernel": lambda c: (c["FUSED_MASS"], c["BLOCK_M"], c["BLOCK_D"], c["HAS_LESS"], c["KV_BITS"]),
    "attn_mass_kernel": lambda c: (c["BLOCK_D"], c["KV_BITS"]),
    "evict_move_kernel": lambda c: (c["WRITE_VICTIMS"], c["BLOCK_D"]),
    "absorb_kernel": lambda c: (c["BLOCK_C"], c["BLOCK_D"]),
    "quantize_int8_kernel": lambda c: c["BLOCK_D"],
    "dequantize_int8_kernel": lambda c: c["BLOCK_D"],
    # smallest, the default budget's, serving sizes (budget 2048 + chunk 256); 8192 to 65536
    # (budgets past 4K, the `full` policy) cost 3-20 s each to compile: in the full space only
    "evict_select_kernel": lambda c: c["BLOCK_T"] in (16, 256, 4096),
}
_CI = {
    "attn_fwd_kernel": {  # decode at both head dims, every row block, the unfused path; the largest
        ("bf16", (True, 16, 64, True, 0)), ("bf16", (True, 16, 128, True, 0)), ("bf16", (True, 32, 128, False, 0)),
        ("bf16", (True, 64, 128, True, 0)), ("bf16", (False, 32, 64, True, 0)), ("fp16", (True, 16, 128, True, 0)),
        ("fp32", (True, 16, 128, True, 0)), ("fp32", (True, 64, 128, True, 0)), ("fp32", (False, 32, 128, True, 0)),
        # quantised slots (kv_bits 8 / 4): decode at both head dims (2 and 4 channel groups), the unfused
        # path, the largest row block, each dtype
        ("bf16", (True, 16, 64, True, 4)), ("bf16", (True, 16, 128, True, 8)), ("bf16", (False, 32, 128, True, 4)),
        ("bf16", (True, 64, 128, True, 4)), ("fp16", (True, 16, 128, False, 4)), ("fp32", (True, 16, 64, True, 8))},
    "attn_mass_kernel": {("bf16", (64, 0)), ("fp16", (128, 0)), ("fp32", (128, 0)), ("bf16", (128, 4)),
                         ("fp32", (64, 8))},
    "evict_move_kernel": {("bf16", (True, 128)), ("fp16", (False, 64)), ("fp32", (True, 64))},
    "absorb_kernel": {("bf16", (16, 64)), ("fp16", (32, 128)), ("fp32", (32, 128))},
    "quantize_int8_kernel": {("bf16", 128), ("fp16", 64), ("fp32", 128)},
    "dequantize_int8_kernel": {("bf16", 128), ("fp16", 64), ("fp32", 128)},
    "evict_select_kernel": {("-", True)},
}


def _in_ci(x: Launch) -> bool:
    """A covering subset of the full space: every kernel x dtype x target, every constexpr value of
    each kernel at least once, the decode hot path, and the attention kernel's most resource-hungry
    configurations (shared memory and registers grow with the blocks: the largest bind)."""
    return (x.dtype, _CI_KEY[x.kernel](x.constexprs)) in _CI[x.kernel]


def _in_decode(x: Launch) -> bool:
    """What one decode step launches for bf16 models (a quick check on a GPU machine's own Triton)."""
    c = x.constexprs
    if x.dtype not in ("bf16", "-"):
        return False
    if x.kernel == "attn_fwd_kernel":
        return c["FUSED_MASS"] and c["BLOCK_M"] == 16 and c["HAS_LESS"]
    return x.kernel == "evict_select_kernel" and c["BLOCK_T"] == 256 or \
        x.kernel in ("evict_move_kernel", "absorb_kernel") and c.get("BLOCK_C", 16) == 16


def space(name: str) -> list[Launch]:
    """"full": configuration_space(); "ci": the covering subset the default tests compile;
    "decode": a decode step's kernels in bf16."""
    keep = {"full": lambda x: True, "ci": _in_ci, "decode": _in_decode}[name]
    return [x for x in configuration_space() if keep(x)]


def _jit_function(launch: Launch):
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(f"lessserve.kernels.triton.{launch.module}")
    fn = getattr(mod, launch.kernel)
    if not isinstance(fn, JITFunction):
        raise KernelUnavailableError(f"{launch.kernel} is {type(fn).__name__}, not a JITFunction: ahead-of-time "
                                     "compiles need a process without TRITON_INTERPRET=1")
    return fn


def signature(fn, launch: Launch) -> dict[str, str]:
    """Triton signature of `fn` for this launch: constexprs, typed pointers, fp32 / i32 scalars."""
    sig = {}
    for name in fn.arg_names:
        if name in launch.constexprs:
            sig[name] = "constexpr"
        elif name in launch.ptr_types:
            sig[name] = "*" + launch.ptr_types[name]
        elif name.endswith("_ptr"):
            raise KernelUnavailableError(f"{launch.kernel}: launch config gives no element type for {name}")
        else:
            sig[name] = "fp32" if name in launch.float_args else "i32"
    missing = set(launch.constexprs) - set(fn.arg_names)
    if missing:
        raise KernelUnavailableError(f"{launch.kernel}: launch config sets unknown constexprs {sorted(missing)}")
    return sig


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / LOCAL of the cubin's kernel, from `cuobjdump --dump-resource-usage`."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in found.items()}


def compile_launch(launch: Launch, cc: int) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = AotResult(launch.label(), launch.kernel, cc, ok=False, num_warps=launch.num_warps)
    t0 = time.perf_counter()
    try:
        fn = _jit_function(launch)
        sig = signature(fn, launch)
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in launch.ptr_types}
        src = ASTSource(fn=fn, signature=sig, constexprs=launch.constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    except Exception as e:  # noqa: BLE001  (the error text is the result)
        res.error = f"{type(e).__name__}: {e}"[:2000]
        res.seconds = time.perf_counter() - t0
        return res
    ptx = k.asm["ptx"]
    res.ok = True
    res.shared = int(k.metadata.shared)
    res.mma = len(re.findall(r"^\s*mma\.sync", ptx, re.M))
    res.wgmma = len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M))
    res.fma = len(re.findall(r"^\s*fma\.rn\.f32", ptx, re.M))
    usage = _resource_usage(k.asm["cubin"])
    res.regs, res.stack, res.local = usage.get("reg"), usage.get("stack"), usage.get("local")
    res.seconds = time.perf_counter() - t0
    return res


def _compile_pair(args: tuple[Launch, int]) -> dict:
    return asdict(compile_launch(*args))


def compile_all(launches: list[Launch], targets=TARGETS, jobs: int = 1) -> list[dict]:
    """Every launch x target, `jobs` processes at a time; results in input order."""
    work = [(x, cc) for x in launches for cc in targets]
    if jobs <= 1:
        return [_compile_pair(w) for w in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_pair, work, chunksize=4))


def _span(vals: list[int]) -> str:
    lo, hi = min(vals), max(vals)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def format_table(rows: list[dict]) -> str:
    """Markdown: per kernel x target, over its configurations, shared bytes, registers per thread,
    stack bytes per thread (spills), PTX mma.sync / wgmma counts and compile seconds."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["cc"]), []).append(r)
    out = ["| kernel | target | configs | failed | shared B | regs | stack B | mma.sync | wgmma | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, cc), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        cols = [_span([r[k] for r in ok]) if ok else "-" for k in ("shared", "regs", "stack", "mma", "wgmma")]
        out.append(f"| {kernel} | sm_{cc} | {len(rs)} | {len(rs) - len(ok)} | " + " | ".join(cols)
                   + f" | {sum(r['seconds'] for r in rs):.1f} |")
    return "\n".join(out)


def format_rows(rows: list[dict]) -> str:
    """Markdown: one line per configuration and target."""
    out = ["| configuration | target | shared B | regs | stack B | mma.sync | wgmma | fma |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vals = [r[k] for k in ("shared", "regs", "stack", "mma", "wgmma", "fma")] if r["ok"] else ["FAILED"] + [""] * 5
        out.append(f"| `{r['label']}` | sm_{r['cc']} | " + " | ".join(map(str, vals)) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="compile every Triton kernel configuration for GPU targets, no GPU")
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--targets", default=",".join(map(str, TARGETS)))
    p.add_argument("--space", default="ci", choices=["ci", "full", "decode"])
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--rows", action="store_true", help="print one line per configuration, not per kernel")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: TRITON_INTERPRET=1 is set; unset it for ahead-of-time compiles", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = compile_all(space(a.space), [int(t) for t in a.targets.split(",")], a.jobs)
    with open(a.json, "w") as f:
        json.dump({"seconds": time.perf_counter() - t0, "results": rows}, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    print(format_rows(rows) if a.rows else format_table(rows))
    for r in bad:
        print(f"FAILED {r['label']} sm_{r['cc']}: {r['error'][:500]}")
    print(f"aot: {len(rows) - len(bad)}/{len(rows)} compiled in {time.perf_counter() - t0:.1f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
