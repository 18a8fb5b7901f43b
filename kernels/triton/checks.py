"""Validation helpers shared by the Triton launch wrappers (typed errors, no silent fixes)."""

from __future__ import annotations

import os

import torch

from lessserve.kernels.errors import KernelInputError  # noqa: F401  (re-exported)

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # names in launch.py


def interpreting() -> bool:
    """Triton's CPU interpreter is on (set before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise KernelInputError(msg)


def expect_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """shape entries of None match anything."""
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape, strict=False))
    expect(ok, f"{name}: shape {tuple(t.shape)}, expected {shape}")


def expect_float(name: str, t: torch.Tensor) -> None:
    expect(t.dtype in FLOATS, f"{name}: dtype {t.dtype}, expected one of {FLOATS}")


def expect_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None:
            expect(t.device == device, f"{name} is on {t.device}, expected {device}")


def expect_inner_contiguous(name: str, t: torch.Tensor) -> None:
    expect(t.stride(-1) == 1, f"{name}: last dimension must be contiguous (stride {t.stride(-1)})")


_POISON = {"on": False}


def new_output(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer; NaN / -7 filled under `poisoned_outputs()` (tests)."""
    if not _POISON["on"]:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -7
    return torch.full(shape, fill, dtype=dtype, device=device)


class poisoned_outputs:  # noqa: N801  (a context manager used like a function)
    """Within this block every wrapper-allocated output starts as NaN (floats) or -7 (ints), so an
    element a kernel forgets to write fails the comparison with the reference."""

    def __enter__(self):
        self._was = _POISON["on"]
        _POISON["on"] = True
        return self

    def __exit__(self, *exc):
        _POISON["on"] = self._was
        return False
