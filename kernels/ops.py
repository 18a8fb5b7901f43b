"""Public ops with `impl` dispatch. Kernels know nothing of sessions: only tensors and specs."""

from __future__ import annotations

import torch

from lessserve.kernels.dispatch import resolve
from lessserve.kernels.reference.attention import chunk_attention_ref, decode_attention_ref
from lessserve.kernels.reference.evict import EvictionSpec, evict_absorb_ref
from lessserve.kernels.reference.lowrank import LessLayerWeights, phi_ref, psi_ref
from lessserve.kernels.reference.pack import (
    QUANT_MODES,
    PackLayout,
    dequantize_int8_ref,
    pack_slots_ref,
    quantize_int8_ref,
    unpack_slot_ref,
)

__all__ = [
    "QUANT_MODES",
    "EvictionSpec",
    "LessLayerWeights",
    "PackLayout",
    "chunk_attention",
    "decode_attention",
    "dequantize_int8",
    "evict_absorb",
    "pack_slots",
    "quantize_int8",
    "unpack_slot",
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


def quantize_int8(x: torch.Tensor, impl: str | None = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., T, D] -> (int8 [..., T, D], scale fp32 [..., T]), per-token-per-head absmax."""
    if resolve(impl, x.device) == "triton":
        return _triton().quantize_int8(x)
    return quantize_int8_ref(x)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                    impl: str | None = "auto") -> torch.Tensor:
    """q int8 [..., T, D], scale fp32 [..., T] -> [..., T, D] of `dtype`."""
    if resolve(impl, q.device) == "triton":
        return _triton().dequantize_int8(q, scale, dtype)
    return dequantize_int8_ref(q, scale, dtype)


def pack_slots(*args, impl: str | None = "auto", **kw) -> torch.Tensor:
    """Slots of a layer-major slab -> uint8 [n, record_bytes]; see reference/pack.py."""
    if resolve(impl, args[0].device) == "triton":
        return _triton().pack_slots(*args, **kw)
    return pack_slots_ref(*args, **kw)


def unpack_slot(*args, impl: str | None = "auto", **kw) -> None:
    """One packed record -> a (free) slab slot, in place; see reference/pack.py."""
    if resolve(impl, args[1].device) == "triton":
        return _triton().unpack_slot(*args, **kw)
    return unpack_slot_ref(*args, **kw)
