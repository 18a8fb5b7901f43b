"""Ahead-of-time compiles of every Triton kernel for sm_80 and sm_90, without a GPU (marker `aot`).

The compiled configurations are `launch.configuration_space()`: what the wrappers' own launch
functions return over the shape space (dtypes, head_dim 64/128, GQA groups, chunks, LESS on/off,
fused and unfused mass, native and quantised (kv_bits 8 / 4) slots, evict modes and budgets, int8
pack/unpack). A real compile rejects what
the CPU interpreter accepts (it found two evict kernels reading a plain Python global), and decides
shared memory, registers and whether the dots are tensor-core instructions; all are asserted here.

The compiles run in a child process without TRITON_INTERPRET (this process has it on, and the
interpreter's triton.language cannot drive a real compile), into a temporary Triton cache.
`test_wrappers_launch_what_launch_py_says` checks, in this process, that the wrappers launch
exactly the configurations launch.py returns for the same call (so the compiled space is the
launched space).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from lessserve.kernels.triton.aot import SHARED_LIMIT, TARGETS, format_table, space
from lessserve.kernels.triton.launch import Launch, attention_launches, configuration_space

pytestmark = pytest.mark.aot

FULL = configuration_space()
SPACE_NAME = os.environ.get("LESSSERVE_AOT_SPACE", "ci")  # "full": all of FULL (about 5 CPU-minutes)
SPACE = space(SPACE_NAME)
ATTENTION = ("attn_fwd_kernel", "attn_mass_kernel")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, int], dict]:
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    out = tmp / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "lessserve.kernels.triton.aot", "--space", SPACE_NAME,
                           "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert out.is_file(), f"aot child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())["results"]
    print("\n" + format_table(rows))  # kernels x targets: shared, registers, stack, tensor-core counts
    return {(r["label"], r["cc"]): r for r in rows}


@pytest.mark.parametrize("cc", TARGETS)
@pytest.mark.parametrize("launch", SPACE, ids=Launch.label)
def test_compiles_within_limits(compiled, launch: Launch, cc: int):
    r = compiled[(launch.label(), cc)]
    assert r["ok"], r["error"]
    assert 0 <= r["shared"] <= SHARED_LIMIT[cc], f"{r['shared']} B of shared memory > sm_{cc}'s {SHARED_LIMIT[cc]}"
    assert r["regs"] is not None and 0 < r["regs"] <= 255, "register count not reported"
    assert r["stack"] is not None and r["local"] is not None
    native = launch.constexprs.get("DOT_PREC") == "native"
    if launch.kernel in ATTENTION and launch.dtype in ("fp16", "bf16"):
        assert native, "fp16 / bf16 attention must use native (tensor-core) dots on GPU"
        # a silent fall-back to FMA loops shows as no mma / wgmma in the PTX
        if cc == 90 and launch.constexprs["BLOCK_M"] >= 64:
            assert r["wgmma"] > 0 and r["mma"] == 0, f"sm_90: wgmma {r['wgmma']}, mma.sync {r['mma']}"
        else:  # fewer than 64 rows: a warpgroup MMA does not fit, Hopper runs mma.sync
            assert r["mma"] > 0, f"sm_{cc}: no mma.sync in the PTX (wgmma {r['wgmma']})"
    if launch.dtype == "fp32" and launch.kernel in ATTENTION:
        assert r["mma"] == r["wgmma"] == 0, "fp32 data must stay on ieee (FMA) dots"


def test_space_covers_the_wrappers_choices():
    """The dimensions the wrappers branch on all appear in the full space, and the default (CI)
    subset has every kernel x dtype and every constexpr value of each kernel (BLOCK_T, a range of
    13 powers of two, at 16, 256 and 4096: see aot._in_ci)."""
    fwd = [x for x in FULL if x.kernel == "attn_fwd_kernel"]
    assert {x.dtype for x in fwd} == {"fp32", "fp16", "bf16"}
    assert {x.constexprs["BLOCK_D"] for x in fwd} == {64, 128}
    assert {(x.constexprs["FUSED_MASS"], x.constexprs["BLOCK_M"]) for x in fwd} == \
        {(True, 16), (True, 32), (True, 64), (False, 32)}
    assert {x.constexprs["HAS_LESS"] for x in fwd} == {False, True}
    assert {x.constexprs["KV_BITS"] for x in fwd} == {0, 8, 4}  # native and quantised slots
    assert {(x.constexprs["KV_BITS"] > 0, x.constexprs["NG"], x.constexprs["GROUP"]) for x in fwd} == \
        {(False, 1, 1), (True, 2, 32), (True, 4, 32)}  # head_dim 64 / 128: 2 / 4 groups of 32 channels
    quant = [x for x in fwd if x.constexprs["KV_BITS"]]
    assert {x.ptr_types["kc_ptr"] for x in quant} == {"u8"} and {x.ptr_types["kcs_ptr"] for x in quant} == {"fp16"}
    assert {x.constexprs["MODE"] for x in FULL if x.kernel == "evict_select_kernel"} == {0, 1, 2}
    blocks_t = {x.constexprs["BLOCK_T"] for x in FULL if x.kernel == "evict_select_kernel"}
    assert blocks_t == {1 << k for k in range(4, 17)}
    assert {x.kernel for x in FULL} == {"attn_fwd_kernel", "attn_mass_kernel", "evict_select_kernel",
                                         "evict_move_kernel", "absorb_kernel", "quantize_int8_kernel",
                                         "dequantize_int8_kernel"}
    # decode at GQA 8 and head_dim 128 (llama3-8b) in bf16 with LESS is one of them
    want = attention_launches(32, 32, 8, 1, 2048, 128, 8, "bf16", True)[0]
    assert want.key() in {x.key() for x in FULL} and want.key() in {x.key() for x in space("ci")}

    ci = space("ci")
    for kernel in {x.kernel for x in FULL}:
        full_k = [x for x in FULL if x.kernel == kernel]
        ci_k = [x for x in ci if x.kernel == kernel]
        assert {x.dtype for x in ci_k} == {x.dtype for x in full_k}, kernel
        for name in full_k[0].constexprs:
            if name != "BLOCK_T":
                assert {x.constexprs[name] for x in ci_k} == {x.constexprs[name] for x in full_k}, (kernel, name)


# --- the wrappers launch what launch.py returns ------------------------------------------------------
_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
               torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}


class _Recorder:
    """Stands in for a kernel object: records each launch (grid, pointer types, scalars, options)."""

    def __init__(self, kernel, log: list):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kw):
            names = self.kernel.arg_names
            ptrs = {n: _TYPE_NAMES[a.dtype] for n, a in zip(names, args, strict=False) if torch.is_tensor(a)}
            floats = tuple(n for n, a in zip(names, args, strict=False) if isinstance(a, float))
            self.log.append({"kernel": self.kernel.__name__, "grid": tuple(grid), "ptr_types": ptrs, "floats": floats,
                             "options": dict(kw)})
            return self.kernel[grid](*args, **kw)
        return launch


@pytest.fixture
def launches(monkeypatch) -> list:
    import lessserve.kernels.triton.attention as att
    import lessserve.kernels.triton.evict as ev
    import lessserve.kernels.triton.quant as qu

    log: list = []
    for mod, names in ((att, ("attn_fwd_kernel", "attn_mass_kernel")),
                       (ev, ("evict_select_kernel", "evict_move_kernel", "absorb_kernel")),
                       (qu, ("quantize_int8_kernel", "dequantize_int8_kernel"))):
        for name in names:
            monkeypatch.setattr(mod, name, _Recorder(getattr(mod, name), log))
    return log


def _same(rec: dict, want: Launch) -> None:
    assert rec["kernel"] == want.kernel
    assert rec["grid"] == want.grid
    assert rec["ptr_types"] == want.ptr_types
    assert rec["floats"] == want.float_args
    assert rec["options"] == want.options


def test_wrappers_launch_what_launch_py_says(launches, device):
    """Each wrapper's real launches == its launch function's answer; their GPU form is in SPACE."""
    from lessserve.kernels.reference.evict import EvictionSpec
    from lessserve.kernels.reference.kv_quant import quantize_chunk_ref
    from lessserve.kernels.triton import (
        chunk_attention,
        chunk_attention_quant,
        decode_attention,
        evict_absorb,
        pack_slots,
        unpack_slot,
    )
    from lessserve.kernels.triton.checks import interpreting
    from lessserve.kernels.triton.launch import evict_launches, quant_launch

    from .cases import less_state, less_weights, quant_layer, slab_layer, slots
    from .test_pack import _slab

    compiled = {x.key() for x in FULL}
    interp = interpreting()
    checked = []

    def check(wanted: list[Launch]):
        got = launches[len(checked):len(checked) + len(wanted)]
        assert len(got) == len(wanted), [g["kernel"] for g in got]
        for rec, w in zip(got, wanted, strict=True):
            _same(rec, w)
            gpu_form = replace(w, constexprs={**w.constexprs, "DOT_PREC": "native"}) \
                if interp and w.dtype == "bf16" and "DOT_PREC" in w.constexprs else w  # see launch.dot_precision
            assert gpu_form.key() in compiled, f"{w.label()} is launched but not in the compiled space"
            checked.append(rec)

    S, B, D, R = 4, 40, 64, 8
    for (Hkv, G, C, dt, less) in ((3, 3, 1, torch.bfloat16, True), (2, 4, 32, torch.float32, False)):
        kc, vc = slab_layer(S, Hkv, B, D, dt, device)
        length, slot_ids = slots(S, [17, 5], B, device)
        q = torch.randn(2, Hkv * G, C, D, device=device).to(dt)
        kn, vn = (torch.randn(2, Hkv, C, D, device=device).to(dt) for _ in range(2))
        H, z = less_state(S, Hkv, R, D, device) if less else (None, None)
        phi = torch.rand(2, Hkv * G, C, R, device=device) if less else None
        tname = _TYPE_NAMES[dt]
        if C == 1:
            decode_attention(q[:, :, 0], kn[:, :, 0], vn[:, :, 0], kc, vc, length, slot_ids, D**-0.5, H, z,
                             None if phi is None else phi[:, :, 0])
        else:
            chunk_attention(q, kn, vn, kc, vc, length, slot_ids, D**-0.5, H, z, phi)
        check(attention_launches(2, Hkv * G, Hkv, C, B, D, R if less else 0, tname, less, interp))

        pc = torch.randint(0, 100, (S, Hkv, B), dtype=torch.int32, device=device)
        sc = torch.rand(S, Hkv, B, device=device)
        pn = torch.arange(C, device=device)[None].repeat(2, 1) + 1000
        mc, mn = torch.rand(2, Hkv, B, device=device), torch.rand(2, Hkv, C, device=device)
        w = less_weights(Hkv * G, Hkv, D, R, device) if less else None
        evict_absorb(kc, vc, pc, sc, length, slot_ids, kn, vn, pn, mc, mn, EvictionSpec("h2o", B, B // 2), H, z, w)
        check(evict_launches(2, Hkv, B, C, D, R if less else 0, "h2o", tname, less))

    for (Hkv, G, C, dt, bits) in ((3, 3, 1, torch.bfloat16, 4), (1, 8, 17, torch.float32, 8)):  # quantised slots
        length, slot_ids = slots(S, [17, 0], B, device)
        kv = quant_layer(S, Hkv, B, D, bits, length, device)
        q = torch.randn(2, Hkv * G, C, D, device=device).to(dt)
        new = quantize_chunk_ref(*(torch.randn(2, Hkv, C, D, device=device) for _ in range(2)), kv, length, slot_ids)
        H, z = less_state(S, Hkv, R, D, device)
        chunk_attention_quant(q, new, kv, length, slot_ids, D**-0.5, H, z, torch.rand(2, Hkv * G, C, R, device=device))
        check(attention_launches(2, Hkv * G, Hkv, C, B, D, R, _TYPE_NAMES[dt], True, interp, bits))

    L, Hkv = 2, 2
    slab = _slab(L, S, Hkv, B, D, R, torch.float16, device)
    buf = pack_slots(*slab, torch.tensor([2, 0], device=device), "int8")
    check([quant_launch("quantize", 2, Hkv * B, L, D, "fp16")] * 2)  # k, then v
    unpack_slot(buf[0], *slab, slot=1, quant="int8")
    check([quant_launch("dequantize", 1, Hkv * B, L, D, "fp16")] * 2)
    assert len(checked) == len(launches)
