"""Public ops with `impl` dispatch. Kernels know nothing of sessions: only tensors and specs."""

from __future__ import annotations

import torch

from lessserve.kernels.dispatch import resolve
from lessserve.kernels.reference.attention import chunk_attention_ref, decode_attention_ref
from lessserve.kernels.reference.evict import EvictionSpec, evict_absorb_ref
from lessserve.kernels.reference.lowrank import LessLayerWeights, phi_ref, psi_ref

__all__ = [
    "EvictionSpec",
    "LessLayerWeights",
    "chunk_attention",
    "decode_attention",
    "evict_absorb",
    "phi",
    "psi",
]


def _triton():
    from lessserve.kernels import triton as tk  # imported lazily: triton is optional

    return tk


def chunk_attention(*args, impl: str | None = "auto", **kw):
    if resolve(impl, args[0].device) == "triton":
        return _triton().chunk_attention(*args, **kw)
    return chunk_attention_ref(*args, **kw)


def decode_attention(*args, impl: str | None = "auto", **kw):
    if resolve(impl, args[0].device) == "triton":
        return _triton().decode_attention(*args, **kw)
    return decode_attention_ref(*args, **kw)


def evict_absorb(*args, impl: str | None = "auto", **kw) -> torch.Tensor:
    if resolve(impl, args[0].device) == "triton":
        return _triton().evict_absorb(*args, **kw)
    return evict_absorb_ref(*args, **kw)


def phi(q: torch.Tensor, w: LessLayerWeights) -> torch.Tensor:
    return phi_ref(q, w)


def psi(k: torch.Tensor, w: LessLayerWeights) -> torch.Tensor:
    return psi_ref(k, w)
