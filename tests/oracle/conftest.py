"""The oracle runs the engine with Triton kernels too: without CUDA they run under Triton's CPU
interpreter, which must be switched on before triton is imported (as in tests/kernels)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
