"""Raw Triton kernels: int8 per-row absmax quantise / dequantise over [M0, L, M1, D] strided rows.

Grid (M0, cdiv(M1, BLOCK_R), L). Row (i0, l, i1) of x lives at x + i0*sx0 + l*sxl + i1*sx1 (last dim
contiguous); `sel` maps i0 through an index table so slab slots are read / written in place.
"""

import triton
import triton.language as tl


@triton.jit
def quantize_int8_kernel(
    x_ptr, q_ptr, s_ptr, sel_ptr,
    M1, D,
    sx0, sx1, sq0, sq1, ss0, ss1, sxl, sql, ssl,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i0 = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(2).to(tl.int64)
    x_ptr += layer * sxl
    q_ptr += layer * sql
    s_ptr += layer * ssl
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    src0 = tl.load(sel_ptr + i0).to(tl.int64)
    rmask = rows < M1
    mask = rmask[:, None] & (cols[None, :] < D)
    x = tl.load(x_ptr + src0 * sx0 + rows[:, None].to(tl.int64) * sx1 + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
    amax = tl.max(tl.abs(x), axis=1)  # [BLOCK_R]
    scale = tl.where(amax > 0, amax / 127.0, 1.0)
    y = x / scale[:, None]
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0
    y = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))  # half to even, as torch
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    tl.store(q_ptr + i0 * sq0 + rows[:, None].to(tl.int64) * sq1 + cols[None, :], y.to(tl.int8), mask=mask)
    tl.store(s_ptr + i0 * ss0 + rows * ss1, scale, mask=rmask)


@triton.jit
def dequantize_int8_kernel(
    q_ptr, s_ptr, y_ptr, sel_ptr,
    M1, D,
    sq0, sq1, ss0, ss1, sy0, sy1, sql, ssl, syl,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i0 = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(2).to(tl.int64)
    q_ptr += layer * sql
    s_ptr += layer * ssl
    y_ptr += layer * syl
    dst0 = tl.load(sel_ptr + i0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M1
    mask = rmask[:, None] & (cols[None, :] < D)
    q = tl.load(q_ptr + i0 * sq0 + rows[:, None].to(tl.int64) * sq1 + cols[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + i0 * ss0 + rows * ss1, mask=rmask, other=0.0)
    y = q.to(tl.float32) * s[:, None]
    tl.store(y_ptr + dst0 * sy0 + rows[:, None].to(tl.int64) * sy1 + cols[None, :],
             y.to(y_ptr.dtype.element_ty), mask=mask)
