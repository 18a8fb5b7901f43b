"""Launch configurations of the Triton kernels: from a call's shapes to exactly what is launched.

One function per wrapper maps a call's shapes and dtype to the kernels it launches (grid,
constexpr arguments, warps, pipeline stages, the element type of every pointer argument). The
wrappers launch what these return, and the ahead-of-time compile tests (`tests/kernels/test_aot.py`,
through `kernels/triton/aot.py`) compile what `configuration_space()` returns for sm_80 and sm_90,
so the space compiled in CI is the space the wrappers can launch. Pure Python: no torch, no triton.

Element types use Triton's names: "fp32", "fp16", "bf16", "i8", "u8", "i32", "i64".
"""

from __future__ import annotations

from dataclasses import dataclass, field

NUM_WARPS, NUM_STAGES = 4, 3  # Triton's CUDA defaults, made explicit so AOT compiles the same
# Block sizes and warps below were chosen from the ahead-of-time compiles' own resource reports
# (kernels/triton/aot.py; docs/kernels.md has the table), not from GPU timings (none exist yet):
ATTN_BLOCK_N = 64  # keys per block (fp16 / bf16 tensor-core dots)
# fp32 data (ieee dots are FMA loops): 16 keys per block. With 64, the sm_80 compile of BLOCK_M 64 x
# head_dim 128 needed 176 KB of shared memory (over the 163 KB a block may have) and 9-18 KB of
# stack per thread (spills); with 16 it is 68 KB.
ATTN_BLOCK_N_FP32 = 16
ATTN_WIDE_ROWS = 32  # from this many rows per block, 8 warps (4 spilled 0.4-1.9 KB per thread at 64 rows)
# quantised slots (kv_bits 8 / 4: one dot per group of channels, codes unpacked in registers): 32 keys
# per block and 8 warps. With 64 keys and 4 warps, bf16 decode at head_dim 128 spilled 536 B per thread
# on sm_80; with 32 and 8 warps, none (64 rows x head_dim 128 still spills 760 B, 1288 B at 64 keys).
ATTN_BLOCK_N_QUANT = 32
FUSED_MAX_ROWS = 64  # G*C up to this: one row block, mass fused into the pass
UNFUSED_BLOCK_M = 32
EVICT_BLOCK_J = 64
MAX_MERGED = 1 << 16  # B + C per program, held in one block by the select kernel
QUANT_BLOCK_R = 16
EVICT_MODES = {"full": 0, "h2o": 1, "lambda": 2}
FLOAT_TYPES = ("fp32", "fp16", "bf16")
KV_CODES = {8: "u8", 4: "u8"}  # a quantised slab's code element type per kv_bits
KV_GROUP = 32  # channels per scale / zero of a quantised slab (kernels/reference/kv_quant.CHANNEL_GROUP)


@dataclass(frozen=True)
class Launch:
    module: str  # "attention_kernels" | "evict_kernels" | "quant_kernels" (in kernels/triton/)
    kernel: str  # the @triton.jit function's name
    grid: tuple[int, ...]
    constexprs: dict = field(hash=False)
    ptr_types: dict = field(hash=False)  # pointer argument -> element type
    dtype: str = "-"  # the call's data type (what the label names)
    float_args: tuple[str, ...] = ()  # scalar arguments passed as Python floats (fp32); other scalars are ints
    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES

    @property
    def options(self) -> dict:
        """Keyword arguments of the launch: the constexprs plus warps and stages."""
        return {**self.constexprs, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def key(self) -> tuple:
        """What the compiled binary depends on (not the grid)."""
        return (self.module, self.kernel, tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.ptr_types.items())), self.float_args, self.num_warps, self.num_stages)

    def label(self) -> str:
        ce = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel}[{self.dtype}|{ce}|w{self.num_warps}]"


def pow2(x: int, lo: int = 1) -> int:
    p = lo
    while p < x:
        p *= 2
    return p


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_precision(dtype: str, interpret: bool) -> str:
    """ "ieee" = fp32 dot operands: for fp32 data, and for bf16 under the interpreter (whose bf16
    tl.dot returns garbage in triton 3.x); "native" = fp16 / bf16 tensor-core dots."""
    return "ieee" if dtype == "fp32" or (dtype == "bf16" and interpret) else "native"


# --- attention ------------------------------------------------------------------------------------
def attention_launches(n: int, Hq: int, Hkv: int, C: int, B: int, D: int, R: int, dtype: str, use_less: bool,
                       interpret: bool = False, kv_bits: int = 0) -> list[Launch]:
    """chunk_attention / decode_attention: the pass, and the separate mass kernel when G*C > 64.
    kv_bits 8 / 4: the slots' and the chunk's rows are a quantised slab's codes (fp16 scales and zeros
    per group of KV_GROUP channels, fp32 key center); 0 native, where q stands in for those pointers
    (never read)."""
    G = Hq // Hkv
    GC = G * C
    fused = GC <= FUSED_MAX_ROWS
    BLOCK_M = max(16, pow2(GC)) if fused else UNFUSED_BLOCK_M
    BLOCK_D = pow2(D, 16)
    prec = dot_precision(dtype, interpret)
    BLOCK_N = ATTN_BLOCK_N_FP32 if dtype == "fp32" else ATTN_BLOCK_N_QUANT if kv_bits else ATTN_BLOCK_N
    warps = 8 if BLOCK_M >= ATTN_WIDE_ROWS or kv_bits else NUM_WARPS
    less_t = "fp32" if use_less else dtype  # without LESS, q stands in for H / z / phi (never read)
    codes_t = KV_CODES[kv_bits] if kv_bits else dtype  # the slots' and the chunk's rows
    param_t, center_t = ("fp16", "fp32") if kv_bits else (dtype, dtype)
    params = ("kns_ptr", "knz_ptr", "vns_ptr", "vnz_ptr", "kcs_ptr", "kcz_ptr", "vcs_ptr", "vcz_ptr")
    quant = {**dict.fromkeys(params, param_t), "cen_ptr": center_t}
    group = min(KV_GROUP, D) if kv_bits else 1
    qc = dict(KV_BITS=kv_bits, NG=D // group if kv_bits else 1, GROUP=group)
    fwd = Launch(
        "attention_kernels", "attn_fwd_kernel", (n, Hkv, cdiv(GC, BLOCK_M)),
        constexprs=dict(HAS_LESS=use_less, FUSED_MASS=fused, DOT_PREC=prec, BLOCK_M=BLOCK_M,
                        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_R=max(16, pow2(R if use_less else 0)), **qc),
        ptr_types=dict(q_ptr=dtype, kn_ptr=codes_t, vn_ptr=codes_t, kc_ptr=codes_t, vc_ptr=codes_t, len_ptr="i32",
                       slot_ptr="i64", H_ptr=less_t, z_ptr=less_t, phi_ptr=less_t, **quant, out_ptr=dtype,
                       m_ptr="fp32", l_ptr="fp32",
                       logit_ptr="fp32" if fused else dtype, mc_ptr="fp32", mn_ptr="fp32"),
        dtype=dtype, float_args=("scale",), num_warps=warps,
    )
    if fused:
        return [fwd]
    mass = Launch(
        "attention_kernels", "attn_mass_kernel", (n, Hkv, cdiv(B, BLOCK_N) + cdiv(C, BLOCK_N)),
        constexprs=dict(DOT_PREC=prec, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, **qc),
        ptr_types=dict(q_ptr=dtype, kn_ptr=codes_t, kc_ptr=codes_t, len_ptr="i32", slot_ptr="i64", m_ptr="fp32",
                       l_ptr="fp32", mc_ptr="fp32", mn_ptr="fp32",
                       **{k: quant[k] for k in ("kns_ptr", "knz_ptr", "kcs_ptr", "kcz_ptr", "cen_ptr")}),
        dtype=dtype, float_args=("scale",), num_warps=warps,
    )
    return [fwd, mass]


# --- evict-and-absorb -----------------------------------------------------------------------------
def evict_launches(n: int, Hkv: int, B: int, C: int, D: int, R: int, mode: str, dtype: str,
                   use_less: bool) -> list[Launch]:
    """evict_absorb: select, move, and (with LESS) absorb; psi runs in torch between move and absorb.

    select holds all B + C priorities in one block: one warp per 1024 of them (4 to 32); with 4
    warps, 16384 took 7-38 s to compile and spilled, 65536 took 1-9 minutes and 13-18 KB of stack.
    move at head_dim 128 on 8 warps (4 spilled ~0.5 KB); absorb at most 32 victims per block."""
    BLOCK_T = pow2(B + C, 16)
    BLOCK_D = pow2(D, 16)
    victim_t = dtype if use_less else "i32"  # without LESS, the code scratch stands in (never written)
    out = [
        Launch("evict_kernels", "evict_select_kernel", (n, Hkv),
               constexprs=dict(MODE=EVICT_MODES[mode], BLOCK_T=BLOCK_T),
               ptr_types=dict(sc_ptr="fp32", mc_ptr="fp32", mn_ptr="fp32", len_ptr="i32", slot_ptr="i64",
                              code_ptr="i32"),  # no data pointers: dtype "-"
               num_warps=min(32, max(NUM_WARPS, BLOCK_T // 1024))),
        Launch("evict_kernels", "evict_move_kernel", (n, Hkv),
               constexprs=dict(WRITE_VICTIMS=use_less, BLOCK_J=EVICT_BLOCK_J, BLOCK_D=BLOCK_D),
               ptr_types=dict(kc_ptr=dtype, vc_ptr=dtype, pc_ptr="i32", sc_ptr="fp32", len_ptr="i32",
                              slot_ptr="i64", kn_ptr=dtype, vn_ptr=dtype, pn_ptr="i32", mc_ptr="fp32",
                              mn_ptr="fp32", code_ptr="i32", vk_ptr=victim_t, vv_ptr=victim_t,
                              used_ptr="fp32" if use_less else "i32"), dtype=dtype,
               num_warps=8 if BLOCK_D >= 128 else NUM_WARPS),
    ]
    if use_less:
        out.append(Launch("evict_kernels", "absorb_kernel", (n, Hkv),
                          constexprs=dict(BLOCK_C=min(32, pow2(C, 16)), BLOCK_R=pow2(R, 16), BLOCK_D=BLOCK_D),
                          ptr_types=dict(f_ptr="fp32", vv_ptr=dtype, H_ptr="fp32", z_ptr="fp32", slot_ptr="i64"),
                          dtype=dtype))
    return out


# --- int8 codec -----------------------------------------------------------------------------------
def quant_launch(direction: str, M0: int, M1: int, L: int, D: int, dtype: str) -> Launch:
    """quantize (float rows -> int8 + fp32 scales) or dequantize (back to `dtype`), grid (M0, M1 blocks, L)."""
    grid = (M0, cdiv(M1, QUANT_BLOCK_R), L)
    ce = dict(BLOCK_R=QUANT_BLOCK_R, BLOCK_D=pow2(D, 16))
    if direction == "quantize":
        types = dict(x_ptr=dtype, q_ptr="i8", s_ptr="fp32", sel_ptr="i64")
        return Launch("quant_kernels", "quantize_int8_kernel", grid, ce, types, dtype)
    types = dict(q_ptr="i8", s_ptr="fp32", y_ptr=dtype, sel_ptr="i64")
    return Launch("quant_kernels", "dequantize_int8_kernel", grid, ce, types, dtype)


# --- the space the wrappers can launch ------------------------------------------------------------
HEAD_DIMS = (64, 128)  # Llama-2/3 7B-8B and the default model; the wrappers accept up to 256
GQA_GROUPS = (1, 3, 4, 8)  # llama2-7b, smollm2-135m, llama3-8b / -70b, Qwen-style
CHUNKS = (1, 16, 32, 64, 256)  # decode, prefill chunks (the engine's default is 32)
LESS_RANKS = (8,)  # the shipped LESS weights' rank (BLOCK_R 16 covers ranks 1-16)
QUANT_KV_BITS = (8, 4)  # quantised slabs (kv_bits); native is 0


def configuration_space() -> list[Launch]:
    """Every distinct compiled configuration the wrappers launch over the shapes above, deduplicated
    by `Launch.key()` (the grid does not change the binary): per kernel, dtype and constexpr set."""
    seen: dict[tuple, Launch] = {}

    def add(launches):
        for x in launches:
            seen.setdefault(x.key(), x)

    for dt in FLOAT_TYPES:
        for D in HEAD_DIMS:
            for G in GQA_GROUPS:
                for C in CHUNKS:
                    for use_less in (False, True):
                        for R in LESS_RANKS if use_less else (0,):  # (the budget changes no constexpr)
                            for bits in (0, *QUANT_KV_BITS):
                                add(attention_launches(1, G, 1, C, 128, D, R, dt, use_less, kv_bits=bits))
            for C in CHUNKS:
                for use_less in (False, True):
                    add(evict_launches(1, 1, 128, C, D, LESS_RANKS[0], "h2o", dt, use_less))
            for direction in ("quantize", "dequantize"):
                add([quant_launch(direction, 1, 1, 1, D, dt)])
    for mode in EVICT_MODES:  # select: no data pointers; one block of B + C priorities, every power of two
        t = 16
        while t <= MAX_MERGED:
            add(evict_launches(1, 1, t - 1, 1, 64, 0, mode, "fp32", False)[:1])  # B + C = t
            t *= 2
    return list(seen.values())
