"""Launch wrappers for the int8 codec kernels: validate, shape to [M0, M1, D], launch."""

from __future__ import annotations

import torch

from lessserve.kernels.triton.checks import TL_TYPES, expect, expect_float, new_output
from lessserve.kernels.triton.launch import quant_launch
from lessserve.kernels.triton.quant_kernels import dequantize_int8_kernel, quantize_int8_kernel


def quantize_rows(x: torch.Tensor, sel: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    """x [X0, L, M1, D] (strided, last dim contiguous) read at rows sel [M0] ->
    q int8 [M0, L, M1, D], s fp32 [M0, L, M1] (written in place, any strides but the last)."""
    M0, (L, M1, D) = sel.numel(), x.shape[1:]
    if M0 == 0 or M1 == 0 or L == 0:
        return
    ql = quant_launch("quantize", M0, M1, L, D, TL_TYPES[x.dtype])
    quantize_int8_kernel[ql.grid](x, q, s, sel.to(torch.int64), M1, D, x.stride(0), x.stride(2), q.stride(0),
                                  q.stride(2), s.stride(0), s.stride(2), x.stride(1), q.stride(1), s.stride(1),
                                  **ql.options)


def dequantize_rows(q: torch.Tensor, s: torch.Tensor, y: torch.Tensor, sel: torch.Tensor) -> None:
    """q int8 [M0, L, M1, D], s [M0, L, M1] -> y [Y0, L, M1, D] at rows sel [M0] (written in place)."""
    M0, (L, M1, D) = q.shape[0], q.shape[1:]
    if M0 == 0 or M1 == 0 or L == 0:
        return
    ql = quant_launch("dequantize", M0, M1, L, D, TL_TYPES[y.dtype])
    dequantize_int8_kernel[ql.grid](q, s, y, sel.to(torch.int64), M1, D, q.stride(0), q.stride(2), s.stride(0),
                                    s.stride(2), y.stride(0), y.stride(2), q.stride(1), s.stride(1), y.stride(1),
                                    **ql.options)

def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., T, D] float -> (q int8 [..., T, D], scale fp32 [..., T])."""
    expect_float("x", x)
    expect(x.dim() >= 2, f"x: need [..., T, D], got {tuple(x.shape)}")
    lead, D = x.shape[:-1], x.shape[-1]
    xr = x.reshape(1, 1, -1, D).contiguous()  # [1, 1, M, D]
    q = new_output(xr.shape, torch.int8, x.device)
    s = new_output(xr.shape[:3], torch.float32, x.device)
    quantize_rows(xr, torch.zeros(1, dtype=torch.long, device=x.device), q, s)
    return q.view(*lead, D), s.view(lead)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q int8 [..., T, D], scale [..., T] -> [..., T, D] of dtype."""
    expect(q.dtype == torch.int8, f"q: dtype {q.dtype}, expected int8")
    expect(scale.shape == q.shape[:-1], f"scale {tuple(scale.shape)} does not match q {tuple(q.shape)}")
    expect(dtype in (torch.float32, torch.float16, torch.bfloat16), f"dtype {dtype} not supported")
    D = q.shape[-1]
    qr = q.reshape(1, 1, -1, D).contiguous()
    sr = scale.reshape(1, 1, -1).float().contiguous()
    y = new_output(qr.shape, dtype, q.device)
    dequantize_rows(qr, sr, y, torch.zeros(1, dtype=torch.long, device=q.device))
    return y.view(q.shape)
