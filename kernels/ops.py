"""Public ops with `impl` dispatch. Kernels know nothing of sessions: only tensors and specs.

impl "torch" is the fast torch path (kernels/fast_attention.py, fast_evict.py), checked against the
reference (kernels/reference/, the specification) by tests/kernels/test_fast.py; "triton" the fused
Triton kernels. `max_len` (torch only) bounds the cache rows read: an upper bound on every slot's
length the caller knows without a device sync (None: the whole capacity).

Quantised slots (kv_bits 8 / 4, kernels/reference/kv_quant.py) go through `attend_evict_quant` and
`chunk_attention_quant`. Under impl "triton" the attention kernel reads the codes; evict-and-absorb
of a quantised slot has no Triton kernel and runs the fast torch path (kernels/fast_quant.py),
on purpose and said so (`QUANT_EVICT_IMPL`), not silently."""

from __future__ import annotations

import torch

from lessserve.kernels.dispatch import resolve
from lessserve.kernels.fast_attention import chunk_attention_fast, decode_attention_fast
from lessserve.kernels.fast_evict import attend_evict_fast, evict_absorb_fast
from lessserve.kernels.fast_quant import attend_evict_quant_fast, chunk_attention_quant_fast, evict_absorb_quant_fast
from lessserve.kernels.reference.evict import EvictionSpec
from lessserve.kernels.reference.kv_quant import QuantKV, QuantRows, quantize_chunk_ref
from lessserve.kernels.reference.lowrank import LessLayerWeights, phi_ref, psi_ref
from lessserve.kernels.reference.pack import (
    QUANT_MODES,
    PackLayout,
    dequantize_int8_ref,
    pack_fields_ref,
    pack_slots_ref,
    quantize_int8_ref,
    unpack_fields_ref,
    unpack_slot_ref,
)

__all__ = [
    "QUANT_MODES",
    "EvictionSpec",
    "LessLayerWeights",
    "PackLayout",
    "QUANT_EVICT_IMPL",
    "QuantKV",
    "QuantRows",
    "attend_evict",
    "attend_evict_quant",
    "chunk_attention_quant",
    "chunk_attention",
    "decode_attention",
    "dequantize_int8",
    "evict_absorb",
    "pack_fields",
    "pack_slots",
    "unpack_fields",
    "quantize_int8",
    "unpack_slot",
    "phi",
    "psi",
]


def _triton():
    from lessserve.kernels import triton as tk  # imported lazily: triton is optional

    return tk


def chunk_attention(*args, impl: str | None = "auto", max_len: int | None = None, **kw):
    if resolve(impl, args[0].device) == "triton":
        return _triton().chunk_attention(*args, **kw)
    return chunk_attention_fast(*args, max_len=max_len, **kw)


def decode_attention(*args, impl: str | None = "auto", max_len: int | None = None, **kw):
    if resolve(impl, args[0].device) == "triton":
        return _triton().decode_attention(*args, **kw)
    return decode_attention_fast(*args, max_len=max_len, **kw)


def evict_absorb(*args, impl: str | None = "auto", max_len: int | None = None, **kw) -> torch.Tensor:
    if resolve(impl, args[0].device) == "triton":
        return _triton().evict_absorb(*args, **kw)
    return evict_absorb_fast(*args, max_len=max_len, **kw)


def attend_evict(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, pos_cache: torch.Tensor, score_cache: torch.Tensor, length: torch.Tensor,
                 slot_ids: torch.Tensor, pos_new: torch.Tensor, scale: float, spec: EvictionSpec,
                 H: torch.Tensor | None = None, z: torch.Tensor | None = None, phi_q: torch.Tensor | None = None,
                 psi: LessLayerWeights | None = None, impl: str | None = "auto", max_len: int | None = None,
                 host: tuple[list[int], list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of the compressed step: q [n, Hq, C, D], the chunk's k / v [n, Hkv, C, D] ->
    (out [n, Hq, C, D], new lengths [n] int32); the slab's layer views are updated in place.
    Triton: decode_attention (C = 1) or chunk_attention, then evict_absorb. torch: the fused fast
    step (kernels/fast_evict.py; `host` = (slots, lengths) on the host lets the full policy attend
    over views of each slot's rows)."""
    if resolve(impl, q.device) == "triton":
        tk = _triton()
        if q.shape[2] == 1:
            o1, m_cache, m1 = tk.decode_attention(q[:, :, 0], k_new[:, :, 0], v_new[:, :, 0], k_cache, v_cache, length,
                                                  slot_ids, scale, H=H, z=z,
                                                  phi_q=None if phi_q is None else phi_q[:, :, 0])
            out, m_new = o1[:, :, None], m1[..., None]
        else:
            out, m_cache, m_new = tk.chunk_attention(q, k_new, v_new, k_cache, v_cache, length, slot_ids, scale,
                                                     H=H, z=z, phi_q=phi_q)
        new_len = tk.evict_absorb(k_cache, v_cache, pos_cache, score_cache, length, slot_ids, k_new, v_new, pos_new,
                                  m_cache, m_new, spec, H=H, z=z, psi=psi)
        return out, new_len
    return attend_evict_fast(q, k_new, v_new, k_cache, v_cache, pos_cache, score_cache, length, slot_ids, pos_new,
                             scale, spec, H=H, z=z, phi_q=phi_q, psi=psi, max_len=max_len, host=host)


# evict-and-absorb of a quantised slot per impl: no Triton kernel moves codes yet (docs/kernels.md)
QUANT_EVICT_IMPL = {"torch": "torch", "triton": "torch"}


def chunk_attention_quant(q: torch.Tensor, new: QuantRows, kv: QuantKV, length: torch.Tensor,
                          slot_ids: torch.Tensor, scale: float, H=None, z=None, phi_q=None,
                          impl: str | None = "auto", max_len: int | None = None):
    """Attention over quantised slots (reference/quant_slots.py): out [n, Hq, C, D], mass_cache
    [n, Hkv, B], mass_new [n, Hkv, C]; `new` is the chunk as its slots will hold it."""
    if resolve(impl, q.device) == "triton":
        return _triton().chunk_attention_quant(q, new, kv, length, slot_ids, scale, H, z, phi_q)
    return chunk_attention_quant_fast(q, new, kv, length, slot_ids, scale, H, z, phi_q, max_len=max_len)


def attend_evict_quant(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kv: QuantKV,
                       pos_cache: torch.Tensor, score_cache: torch.Tensor, length: torch.Tensor,
                       slot_ids: torch.Tensor, pos_new: torch.Tensor, scale: float, spec: EvictionSpec,
                       H: torch.Tensor | None = None, z: torch.Tensor | None = None,
                       phi_q: torch.Tensor | None = None, psi: LessLayerWeights | None = None,
                       impl: str | None = "auto", max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """attend_evict over a quantised slab layer `kv` (written in place): the chunk is quantised
    first (empty slots take its key center), attention reads the codes, evict-and-absorb moves
    codes, scales and zeros as they are. Triton: the attention kernel, then the torch evict
    (QUANT_EVICT_IMPL) over the whole capacity (no host-known bound: graph-safe)."""
    if resolve(impl, q.device) == "triton":
        new = quantize_chunk_ref(k_new, v_new, kv, length, slot_ids)
        out, mc, mn = _triton().chunk_attention_quant(q, new, kv, length, slot_ids, scale, H, z, phi_q)
        return out, evict_absorb_quant_fast(kv, pos_cache, score_cache, length, slot_ids, new, pos_new, mc, mn,
                                            spec, H, z, psi)
    return attend_evict_quant_fast(q, k_new, v_new, kv, pos_cache, score_cache, length, slot_ids, pos_new, scale,
                                   spec, H=H, z=z, phi_q=phi_q, psi=psi, max_len=max_len)


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


def pack_fields(fields: dict[str, torch.Tensor], length: torch.Tensor, slot_ids: torch.Tensor,
                layout: PackLayout) -> torch.Tensor:
    """A quantised slab's slots -> uint8 [n, record_bytes] (reference/pack.py). Plain section copies,
    already bandwidth-bound in torch on any device: no Triton kernel (as the Triton pack does for
    quant "none")."""
    return pack_fields_ref(fields, length, slot_ids, layout)


def unpack_fields(record: torch.Tensor, fields: dict[str, torch.Tensor], length: torch.Tensor, slot: int,
                  layout: PackLayout) -> None:
    """One record of a quantised slab -> slot `slot`, in place, byte for byte."""
    unpack_fields_ref(record.to(length.device), fields, length, slot, layout)
