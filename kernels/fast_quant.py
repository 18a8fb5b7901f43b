"""Fast torch attention and evict-and-absorb over quantised slots (the `torch` implementation;
kernels/reference/quant_slots.py is the spec).

The step gathers the batch's codes and parameters, never a dequantised copy: [cache rows [0, Lb) |
the chunk's codes] in one layout, as the native fast path gathers k / v (kernels/fast_attention.py).
Attention reads the codes (unpacked to integers for the matmuls) with the parameters folded in
(fast_attention.Fold: scales into the score columns and the probabilities per channel group, zeros
and the key center as rank-one terms). Evict-and-absorb ranks entries where they lie
(kernels/fast_evict.py), moves the kept entries' codes, scales and zeros as they are, and
dequantises only the victims (at most C rows per slot and head) for psi. No host synchronisation
(CUDA-graph safe).
"""

from __future__ import annotations

import torch

from lessserve.kernels.fast_attention import Fold, attend_cat, gather_cat, valid_rows
from lessserve.kernels.fast_evict import append_rows, evict_rows, take_rows
from lessserve.kernels.reference.evict import EvictionSpec
from lessserve.kernels.reference.kv_quant import QuantKV, QuantRows, dequantize_rows, quantize_chunk_ref, unpack_codes
from lessserve.kernels.reference.lowrank import LessLayerWeights


def gather_quant(kv: QuantKV, slot_ids: torch.Tensor, new: QuantRows, max_len: int | None) -> QuantRows:
    """[cache rows [0, Lb) of each slot | the chunk] of codes [n, Hkv, Lb + C, Dc] and their scales and
    zeros [n, Hkv, Lb + C, NG]."""
    return QuantRows(*(gather_cat(c, slot_ids, x, max_len) for c, x in zip(kv[:6], new, strict=True)))


def attend_quant_cat(q: torch.Tensor, cat: QuantRows, bits: int, center: torch.Tensor, valid: torch.Tensor,
                     scale: float, H, z, phi_q) -> tuple[torch.Tensor, torch.Tensor]:
    """attend_cat over codes: center [n, Hkv, D] the slots' key centers, H / z already selected."""
    return attend_cat(q, unpack_codes(cat.k, bits), unpack_codes(cat.v, bits), valid, scale, H, z, phi_q,
                      fold=Fold(cat.ks, cat.kz, cat.vs, cat.vz, center))


def _less(H, z, phi_q, slot_ids):
    use_less = phi_q is not None and H is not None and z is not None
    return (H[slot_ids], z[slot_ids], phi_q) if use_less else (None, None, None)


def chunk_attention_quant_fast(q: torch.Tensor, new: QuantRows, kv: QuantKV, length: torch.Tensor,
                               slot_ids: torch.Tensor, scale: float, H=None, z=None, phi_q=None,
                               max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`chunk_attention_quant_ref`'s contract: out [n, Hq, C, D], mass_cache [n, Hkv, B], mass_new [n, Hkv, C]."""
    C, B = q.shape[2], kv.k.shape[2]
    cat = gather_quant(kv, slot_ids, new, max_len)
    Lb = cat.k.shape[2] - C
    _, valid = valid_rows(length, slot_ids, Lb)
    out, mass = attend_quant_cat(q, cat, kv.bits, kv.kc[slot_ids], valid, scale, *_less(H, z, phi_q, slot_ids))
    mass_cache = torch.zeros(q.shape[0], kv.k.shape[1], B, dtype=torch.float32, device=q.device)
    mass_cache[..., :Lb] = mass[..., :Lb]
    return out, mass_cache, mass[..., Lb:].contiguous()


def _evict_or_append(kv: QuantKV, cat: QuantRows, new: QuantRows, pos_cache, score_cache, slot_ids, ln, pos_new,
                     mass, spec: EvictionSpec, H, z, psi) -> torch.Tensor:
    C, B = pos_new.shape[1], kv.k.shape[2]
    Lb = mass.shape[2] - C
    if spec.mode == "full" or Lb + C <= B:  # room for the chunk in every slot
        return append_rows(tuple(zip(kv[:6], new, strict=True)), pos_cache, score_cache, slot_ids, ln, pos_new, mass)
    center = kv.kc[slot_ids]

    def victims(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # idx [n, Hkv, V] -> fp32 [n, Hkv, V, D]
        k, ks, kz, v, vs, vz = (take_rows(x, idx) for x in cat)
        return dequantize_rows(k, ks, kz, kv.bits, center), dequantize_rows(v, vs, vz, kv.bits)

    return evict_rows(tuple(zip(kv[:6], cat, strict=True)), pos_cache, score_cache, slot_ids, ln, pos_new, mass,
                      spec, H, z, psi, victims)


def evict_absorb_quant_fast(kv: QuantKV, pos_cache: torch.Tensor, score_cache: torch.Tensor, length: torch.Tensor,
                            slot_ids: torch.Tensor, new: QuantRows, pos_new: torch.Tensor,
                            mass_cache: torch.Tensor,  # [n, Hkv, B]
                            mass_new: torch.Tensor,  # [n, Hkv, C]
                            spec: EvictionSpec, H=None, z=None, psi: LessLayerWeights | None = None,
                            max_len: int | None = None) -> torch.Tensor:
    """`evict_absorb_quant_ref`'s contract (new lengths [n] int32); `max_len` as in attend_evict_fast."""
    cat = gather_quant(kv, slot_ids, new, max_len)
    Lb = cat.k.shape[2] - pos_new.shape[1]
    ln, valid = valid_rows(length, slot_ids, Lb)
    mass = torch.cat([mass_cache[..., :Lb].float() * valid[:, None, :], mass_new.float()], dim=2)
    return _evict_or_append(kv, cat, new, pos_cache, score_cache, slot_ids, ln, pos_new, mass, spec, H, z, psi)


def attend_evict_quant_fast(
    q: torch.Tensor,  # [n, Hq, C, D] post-RoPE
    k_new: torch.Tensor,  # [n, Hkv, C, D]
    v_new: torch.Tensor,
    kv: QuantKV,  # one layer of a quantised slab, written in place
    pos_cache: torch.Tensor,  # [S, Hkv, B] int32
    score_cache: torch.Tensor,  # [S, Hkv, B] fp32
    length: torch.Tensor,  # [S] read only
    slot_ids: torch.Tensor,  # [n]
    pos_new: torch.Tensor,  # [n, C]
    scale: float,
    spec: EvictionSpec,
    H: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    phi_q: torch.Tensor | None = None,
    psi: LessLayerWeights | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend_evict_quant_ref`'s contract: out [n, Hq, C, D] and the new lengths [n] int32."""
    C = q.shape[2]
    new = quantize_chunk_ref(k_new, v_new, kv, length, slot_ids)  # C rows: the reference's codec
    cat = gather_quant(kv, slot_ids, new, max_len)
    Lb = cat.k.shape[2] - C
    ln, valid = valid_rows(length, slot_ids, Lb)
    out, mass = attend_quant_cat(q, cat, kv.bits, kv.kc[slot_ids], valid, scale, *_less(H, z, phi_q, slot_ids))
    return out, _evict_or_append(kv, cat, new, pos_cache, score_cache, slot_ids, ln, pos_new, mass, spec, H, z, psi)
