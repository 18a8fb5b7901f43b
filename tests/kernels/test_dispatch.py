"""`impl` dispatch: auto picks Triton only on CUDA; triton is refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from lessserve.kernels import ops
from lessserve.kernels.dispatch import KernelUnavailableError, resolve


def test_auto_is_torch_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("LESSSERVE_KERNELS", raising=False)
    assert resolve("auto", torch.device("cpu")) == "torch"
    if torch.cuda.is_available():
        assert resolve("auto", torch.device("cuda")) == "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is switched on only without CUDA")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    assert resolve("triton", torch.device("cpu")) == "triton"  # conftest set TRITON_INTERPRET=1 (no CUDA)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelUnavailableError):
        resolve("triton", torch.device("cpu"))


def test_env_default_is_validated(monkeypatch):
    monkeypatch.setenv("LESSSERVE_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="LESSSERVE_KERNELS"):
        resolve(None, torch.device("cpu"))
    with pytest.raises(ValueError):
        resolve("fast", torch.device("cpu"))


def test_public_ops_exist():
    for name in ("chunk_attention", "decode_attention", "evict_absorb", "quantize_int8", "dequantize_int8",
                 "pack_slots", "unpack_slot"):
        assert callable(getattr(ops, name))
