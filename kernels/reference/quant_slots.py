"""Attention and evict-and-absorb over a quantised slot (torch reference, the specification).

A quantised step is the native step (reference/attention.py, reference/evict.py) over what the
slot holds (kernels/reference/kv_quant.py):
  1. the chunk is quantised first (an empty slot takes its key center from it), and everything
     this step does with the chunk uses its dequantised keys and values;
  2. attention over the dequantised slot + the dequantised chunk + the LESS state;
  3. evict-and-absorb moves the kept entries' codes, scales and zeros as they are (never re-quantised)
     and absorbs the victims' dequantised keys and values into H and z.
"""

from __future__ import annotations

import torch

from lessserve.kernels.reference.attention import chunk_attention_ref
from lessserve.kernels.reference.evict import EvictionSpec, evict_rows_ref
from lessserve.kernels.reference.kv_quant import (
    QuantKV,
    QuantRows,
    dequantize_chunk,
    dequantize_layer,
    dequantize_rows,
    quantize_chunk_ref,
)
from lessserve.kernels.reference.lowrank import LessLayerWeights


def chunk_attention_quant_ref(
    q: torch.Tensor,  # [n, Hq, C, D]
    new: QuantRows,  # the chunk, quantised with its slots' key centers
    kv: QuantKV,  # one layer of a quantised slab
    length: torch.Tensor,  # [S]
    slot_ids: torch.Tensor,  # [n]
    scale: float,
    H: torch.Tensor | None = None,  # [S, Hkv, R, D] fp32
    z: torch.Tensor | None = None,  # [S, Hkv, R]
    phi_q: torch.Tensor | None = None,  # [n, Hq, C, R]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chunk_attention_ref's contract over what the slot holds: out [n, Hq, C, D], mass_cache
    [n, Hkv, B], mass_new [n, Hkv, C]."""
    kc, vc = dequantize_layer(kv)  # [S, Hkv, B, D] fp32: the whole layer (the spec, not fast)
    kn, vn = dequantize_chunk(new, kv, slot_ids)
    return chunk_attention_ref(q, kn, vn, kc, vc, length, slot_ids, scale, H, z, phi_q)


def evict_absorb_quant_ref(
    kv: QuantKV,  # written in place
    pos_cache: torch.Tensor,  # [S, Hkv, B] int32
    score_cache: torch.Tensor,  # [S, Hkv, B] fp32
    length: torch.Tensor,  # [S] read only
    slot_ids: torch.Tensor,  # [n]
    new: QuantRows,
    pos_new: torch.Tensor,  # [n, C]
    mass_cache: torch.Tensor,  # [n, Hkv, B]
    mass_new: torch.Tensor,  # [n, Hkv, C]
    spec: EvictionSpec,
    H: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    psi: LessLayerWeights | None = None,
) -> torch.Tensor:
    """evict_absorb_ref's contract for a quantised slot: codes, scales and zeros move as they are."""
    center = kv.kc[slot_ids]  # [n, Hkv, D]

    def kv_of(m: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return dequantize_rows(*m[:3], kv.bits, center), dequantize_rows(*m[3:], kv.bits)

    rows = tuple(zip(kv[:6], new, strict=True))  # (k, ks, kz, v, vs, vz): (slot field, chunk field)
    return evict_rows_ref(rows, pos_cache, score_cache, length, slot_ids, pos_new, mass_cache, mass_new, spec,
                          H, z, psi, kv_of=kv_of)


def attend_evict_quant_ref(
    q: torch.Tensor,  # [n, Hq, C, D]
    k_new: torch.Tensor,  # [n, Hkv, C, D] the chunk's keys (post-RoPE), model dtype
    v_new: torch.Tensor,
    kv: QuantKV,
    pos_cache: torch.Tensor,
    score_cache: torch.Tensor,
    length: torch.Tensor,  # [S] read only
    slot_ids: torch.Tensor,
    pos_new: torch.Tensor,  # [n, C]
    scale: float,
    spec: EvictionSpec,
    H: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    phi_q: torch.Tensor | None = None,
    psi: LessLayerWeights | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of the compressed step over quantised slots: (out [n, Hq, C, D], new lengths [n])."""
    new = quantize_chunk_ref(k_new, v_new, kv, length, slot_ids)
    out, mc, mn = chunk_attention_quant_ref(q, new, kv, length, slot_ids, scale, H, z, phi_q)
    return out, evict_absorb_quant_ref(kv, pos_cache, score_cache, length, slot_ids, new, pos_new, mc, mn, spec,
                                       H, z, psi)
