"""Quantised session slots: the codec of a slot's keys and values (torch reference, the specification).

A quantised slot (kv_bits 8 or 4) holds, per layer, KV head and entry, for each group of 32
channels g (all of head_dim when it is smaller):
  keys    k[c] = k_center[c] + k_zero[g] + k_scale[g] * k_code[c]
  values  v[c] =               v_zero[g] + v_scale[g] * v_code[c]
Codes are unsigned (asymmetric min / max quantisation): 8 bits a uint8 in [0, 255], 4 bits [0, 15]
packed two per uint8 (channel 2j in the low nibble of byte j, 2j + 1 in the high one). Scale and
zero are fp16, per entry and channel group; the key center is fp32, per (slot, KV head) and channel.

Why this layout (measured on the default model, docs/engine.md "Quantised slots"): KIVI quantises
keys per channel over groups of tokens because a few key channels carry large values; but a
compressed slot's entries move at every eviction, and a group of tokens whose membership changes
would have to be re-quantised (and drift). Here every parameter belongs to one entry (moves with
it, never re-quantised) or to the whole slot: the slot takes its key center (each channel's mean
key) from its first chunk and keeps it until reset, so the keys' per-channel offsets cost no
resolution; channel groups of 32 keep an outlier channel from coarsening the rest of the row.

What the slot "holds" is the dequantised value in fp32; attention, eviction scores and LESS
absorption all use it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

KV_BITS = ("native", "8", "4")
LEVELS = {8: 255, 4: 15}  # the largest code
CHANNEL_GROUP = 32
_FP16_MAX, _SCALE_MIN = 65504.0, 2.0**-24


class QuantKV(NamedTuple):
    """One layer of a quantised slab (views of the slab's tensors). NG = channel groups per row."""

    k: torch.Tensor  # [S, Hkv, B, Dc] uint8 codes (Dc = D, or D / 2 for 4 bits)
    ks: torch.Tensor  # [S, Hkv, B, NG] fp16 scales
    kz: torch.Tensor  # [S, Hkv, B, NG] fp16 zeros
    v: torch.Tensor  # [S, Hkv, B, Dc]
    vs: torch.Tensor  # [S, Hkv, B, NG]
    vz: torch.Tensor  # [S, Hkv, B, NG]
    kc: torch.Tensor  # [S, Hkv, D] fp32 key center
    bits: int


class QuantRows(NamedTuple):
    """A chunk's keys and values as a quantised slot holds them (the key center is the slot's)."""

    k: torch.Tensor  # [n, Hkv, C, Dc]
    ks: torch.Tensor  # [n, Hkv, C, NG]
    kz: torch.Tensor
    v: torch.Tensor
    vs: torch.Tensor
    vz: torch.Tensor


def bits_of(kv_bits: str | int) -> int:
    """"8" / "4" -> 8 / 4; "native" -> 0."""
    return 0 if str(kv_bits) == "native" else int(kv_bits)


def code_width(D: int, bits: int) -> int:
    """Bytes of codes per row of D channels."""
    if bits == 4 and D % 2:
        raise ValueError(f"4-bit codes pack two channels per byte: head_dim {D} is odd")
    return D if bits == 8 else D // 2


def channel_group(D: int) -> int:
    """Channels per scale / zero: 32, or the whole head when it is smaller."""
    g = min(CHANNEL_GROUP, D)
    if D % g:
        raise ValueError(f"head_dim {D} is not a multiple of the channel group {g}")
    return g


def pack4(u: torch.Tensor) -> torch.Tensor:
    """u uint8 [..., D] in [0, 15] -> uint8 [..., D / 2]."""
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., Dc] -> uint8 codes [..., D]."""
    if bits == 8:
        return codes
    return torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)


def key_center(k: torch.Tensor) -> torch.Tensor:
    """k [..., C, D] (a chunk's keys) -> fp32 [..., D]: each channel's mean."""
    return k.float().mean(dim=-2)


def quantize_rows(x: torch.Tensor, bits: int, center: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., T, D] -> (codes uint8 [..., T, Dc], scale fp16 [..., T, NG], zero fp16 [..., T, NG]);
    keys minus center [..., D] first."""
    y = x.float() if center is None else x.float() - center[..., None, :]
    D = y.shape[-1]
    g = channel_group(D)
    yg = y.unflatten(-1, (D // g, g))  # [..., T, NG, g]
    lo, hi = yg.amin(dim=-1), yg.amax(dim=-1)
    zero = lo.clamp(-_FP16_MAX, _FP16_MAX).half()
    scale = torch.where(hi > lo, ((hi - lo) / LEVELS[bits]).clamp(_SCALE_MIN, _FP16_MAX),
                        torch.ones_like(lo)).half()
    u = torch.round((yg - zero.float()[..., None]) / scale.float()[..., None]).clamp_(0, LEVELS[bits])
    u = u.flatten(-2).to(torch.uint8)
    return (u if bits == 8 else pack4(u)), scale, zero


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    center: torch.Tensor | None = None) -> torch.Tensor:
    """codes [..., T, Dc], scale / zero [..., T, NG], center [..., D] or None -> fp32 [..., T, D]:
    what the slot holds."""
    u = unpack_codes(codes, bits).float()
    NG = scale.shape[-1]
    x = (u.unflatten(-1, (NG, -1)) * scale.float()[..., None] + zero.float()[..., None]).flatten(-2)
    return x if center is None else x + center[..., None, :]


def quantize_chunk_ref(k_new: torch.Tensor, v_new: torch.Tensor, kv: QuantKV, length: torch.Tensor,
                       slot_ids: torch.Tensor) -> QuantRows:
    """The chunk k_new / v_new [n, Hkv, C, D] as its slots will hold it. A slot still empty
    (length 0) takes its key center from this chunk first (written into kv.kc in place)."""
    fresh = length[slot_ids].to(k_new.device) == 0  # [n]
    center = torch.where(fresh[:, None, None], key_center(k_new), kv.kc[slot_ids])  # [n, Hkv, D]
    kv.kc[slot_ids] = center
    return QuantRows(*quantize_rows(k_new, kv.bits, center), *quantize_rows(v_new, kv.bits))


def dequantize_chunk(new: QuantRows, kv: QuantKV, slot_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantised chunk -> (k, v) fp32 [n, Hkv, C, D] (its slots' key centers)."""
    return (dequantize_rows(new.k, new.ks, new.kz, kv.bits, kv.kc[slot_ids]),
            dequantize_rows(new.v, new.vs, new.vz, kv.bits))


def dequantize_layer(kv: QuantKV) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot of the layer -> (k, v) fp32 [S, Hkv, B, D] (the reference's view of the slab)."""
    return (dequantize_rows(kv.k, kv.ks, kv.kz, kv.bits, kv.kc), dequantize_rows(kv.v, kv.vs, kv.vz, kv.bits))
