"""Choose an implementation per op: `auto` (Triton on CUDA, torch elsewhere), `torch`, `triton`.

The env var LESSSERVE_KERNELS sets the default for `auto`-less callers (CLI and server config
pass their `--kernels` value explicitly).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from lessserve.errors.tree import ConfigError
from lessserve.kernels.errors import KernelUnavailableError

Impl = Literal["auto", "torch", "triton"]
IMPLS = ("auto", "torch", "triton")


def default_impl() -> str:
    impl = os.environ.get("LESSSERVE_KERNELS", "auto")
    if impl not in IMPLS:
        raise ConfigError(f"LESSSERVE_KERNELS={impl!r}: expected one of {IMPLS}")
    return impl


def triton_usable(device: torch.device) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve(impl: str | None, device: torch.device) -> str:
    """Map `auto`/None to a concrete implementation; validate `triton`."""
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ConfigError(f"kernels impl {impl!r}: expected one of {IMPLS}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if impl == "triton" and not triton_usable(device):
        raise KernelUnavailableError(
            "kernels=triton needs triton and a CUDA device (or TRITON_INTERPRET=1 set before import)"
        )
    return impl
