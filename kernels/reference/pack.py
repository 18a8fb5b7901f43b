"""Session pack / unpack (torch reference): int8 codec and slot <-> contiguous buffer.

quantize_int8: per-token-per-head absmax, scale = absmax / 127 (1.0 for an all-zero row), so
|x - dequant(quant(x))| <= scale / 2 per element.

A packed buffer is uint8 [n, record_bytes], one record per slot, so one record can be restored
into any free slot. A record holds, in this order, each section 16-byte aligned:
  k   [L, Hkv, B, D]  slab dtype ("none") or int8 ("int8")
  k_scale [L, Hkv, B] fp32 (int8 only)
  v, v_scale          as k
  pos [L, Hkv, B] int32, score [L, Hkv, B] fp32, H [L, Hkv, R, D] fp32, z [L, Hkv, R] fp32,
  length [1] int32
The LESS state (H, z) and scores are never quantised.

A quantised slab's record (kv_bits 8 / 4, kernels/reference/kv_quant.py) holds its slot as it is,
no second quantisation: k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_center in place of k
and v (quant "none" only), then pos, score, H, z, length as above; every section a plain copy, so
the same bytes go in and come out (`pack_fields_ref` / `unpack_fields_ref`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lessserve.kernels.errors import PackError
from lessserve.kernels.reference.kv_quant import KV_BITS, bits_of, channel_group, code_width

QUANT_MODES = ("none", "int8")
_ALIGN = 16


def quantize_int8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., T, D] float -> (q int8 [..., T, D], scale fp32 [..., T])."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # [..., T]
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(xf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_ref(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q int8 [..., T, D], scale fp32 [..., T] -> x [..., T, D] of `dtype`."""
    return (q.float() * scale.float()[..., None]).to(dtype)


@dataclass(frozen=True)
class PackLayout:
    """Byte layout of one slot record; built from the slab's shapes and the quant mode."""

    L: int
    Hkv: int
    B: int
    D: int
    R: int
    dtype: torch.dtype
    quant: str
    kv_bits: str = "native"  # the slab's: "native", or "8" / "4" (a quantised slab's codes and scales)

    def __post_init__(self):
        if self.quant not in QUANT_MODES:
            raise PackError(f"quant {self.quant!r}: expected one of {QUANT_MODES}")
        if self.kv_bits not in KV_BITS:
            raise PackError(f"kv_bits {self.kv_bits!r}: expected one of {KV_BITS}")
        if self.kv_bits != "native" and self.quant != "none":
            raise PackError(f"a kv_bits {self.kv_bits} slot travels as it is: quant must be 'none', got {self.quant!r}")

    def sections(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        L, Hkv, B, D, R = self.L, self.Hkv, self.B, self.D, self.R
        if self.kv_bits != "native":
            bits = bits_of(self.kv_bits)
            codes = (torch.uint8, (L, Hkv, B, code_width(D, bits)))
            params = (torch.float16, (L, Hkv, B, D // channel_group(D)))
            out = [("k_codes", *codes), ("k_scale", *params), ("k_zero", *params), ("v_codes", *codes),
                   ("v_scale", *params), ("v_zero", *params), ("k_center", torch.float32, (L, Hkv, D))]
        else:
            kv_dtype = torch.int8 if self.quant == "int8" else self.dtype
            out = [("k", kv_dtype, (L, Hkv, B, D))]
            if self.quant == "int8":
                out.append(("k_scale", torch.float32, (L, Hkv, B)))
            out.append(("v", kv_dtype, (L, Hkv, B, D)))
            if self.quant == "int8":
                out.append(("v_scale", torch.float32, (L, Hkv, B)))
        out += [("pos", torch.int32, (L, Hkv, B)), ("score", torch.float32, (L, Hkv, B)),
                ("H", torch.float32, (L, Hkv, R, D)), ("z", torch.float32, (L, Hkv, R)),
                ("length", torch.int32, (1,))]
        return out

    def offsets(self) -> dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]]:
        """name -> (byte offset, byte size, dtype, shape) within a record."""
        off, res = 0, {}
        for name, dt, shape in self.sections():
            size = dt.itemsize
            for s in shape:
                size *= s
            res[name] = (off, size, dt, shape)
            off += -(-size // _ALIGN) * _ALIGN
        return res

    @property
    def record_bytes(self) -> int:
        off, size, _, _ = self.offsets()["length"]
        return -(-(off + size) // _ALIGN) * _ALIGN

    @staticmethod
    def of(k: torch.Tensor, H: torch.Tensor, quant: str) -> PackLayout:
        """k: [L, S, Hkv, B, D] slab keys; H: [L, S, Hkv, R, D]."""
        if k.dim() != 5 or H.dim() != 5:
            raise PackError(f"expected layer-major slab tensors, got k {tuple(k.shape)}, H {tuple(H.shape)}")
        L, _, Hkv, B, D = k.shape
        return PackLayout(L, Hkv, B, D, H.shape[3], k.dtype, quant)

    @staticmethod
    def of_quantised(k_codes: torch.Tensor, k_center: torch.Tensor, H: torch.Tensor, kv_bits: str,
                     dtype: torch.dtype) -> PackLayout:
        """A quantised slab: k_codes [L, S, Hkv, B, Dc], k_center [L, S, Hkv, D], H [L, S, Hkv, R, D]."""
        if k_codes.dim() != 5 or k_center.dim() != 4 or H.dim() != 5:
            raise PackError(f"expected layer-major slab tensors, got codes {tuple(k_codes.shape)}, center "
                            f"{tuple(k_center.shape)}, H {tuple(H.shape)}")
        L, _, Hkv, B, _ = k_codes.shape
        return PackLayout(L, Hkv, B, k_center.shape[3], H.shape[3], dtype, "none", kv_bits)


def section_view(buf: torch.Tensor, layout: PackLayout, name: str) -> torch.Tensor:
    """Typed view of one section of every record: buf uint8 [n, record_bytes] -> [n, *shape]."""
    if buf.dtype != torch.uint8 or buf.dim() != 2 or buf.shape[1] != layout.record_bytes:
        raise PackError(f"buffer {tuple(buf.shape)} {buf.dtype} is not uint8 [n, {layout.record_bytes}]")
    off, size, dt, shape = layout.offsets()[name]
    return buf[:, off : off + size].view(dt).view(buf.shape[0], *shape)


def pack_slots_ref(
    k: torch.Tensor,  # [L, S, Hkv, B, D]
    v: torch.Tensor,  # [L, S, Hkv, B, D]
    pos: torch.Tensor,  # [L, S, Hkv, B] int32
    score: torch.Tensor,  # [L, S, Hkv, B] fp32
    H: torch.Tensor,  # [L, S, Hkv, R, D] fp32
    z: torch.Tensor,  # [L, S, Hkv, R] fp32
    length: torch.Tensor,  # [S] int32
    slot_ids: torch.Tensor,  # [n] long
    quant: str = "none",
) -> torch.Tensor:
    """Gather slots into one contiguous uint8 buffer [n, record_bytes]."""
    layout = PackLayout.of(k, H, quant)
    n = slot_ids.numel()
    buf = torch.zeros(n, layout.record_bytes, dtype=torch.uint8, device=k.device)
    sel = lambda t: t[:, slot_ids].transpose(0, 1)  # noqa: E731  [L, n, ...] -> [n, L, ...]
    for name, src in (("k", k), ("v", v)):
        if quant == "int8":
            q, s = quantize_int8_ref(sel(src))
            section_view(buf, layout, name).copy_(q)
            section_view(buf, layout, name + "_scale").copy_(s)
        else:
            section_view(buf, layout, name).copy_(sel(src))
    for name, src in (("pos", pos), ("score", score), ("H", H), ("z", z)):
        section_view(buf, layout, name).copy_(sel(src))
    section_view(buf, layout, "length").copy_(length[slot_ids].to(torch.int32)[:, None])
    return buf


def unpack_slot_ref(
    record: torch.Tensor,  # [record_bytes] uint8, one slot's record
    k: torch.Tensor,  # [L, S, Hkv, B, D] written in place
    v: torch.Tensor,
    pos: torch.Tensor,
    score: torch.Tensor,
    H: torch.Tensor,
    z: torch.Tensor,
    length: torch.Tensor,  # [S]
    slot: int,
    quant: str = "none",
) -> None:
    """Scatter one packed record into slab slot `slot` (dequantising k/v if needed)."""
    layout = PackLayout.of(k, H, quant)
    buf = record.reshape(1, -1)
    for name, dst in (("k", k), ("v", v)):
        if quant == "int8":
            x = dequantize_int8_ref(section_view(buf, layout, name)[0],
                                    section_view(buf, layout, name + "_scale")[0], dst.dtype)
        else:
            x = section_view(buf, layout, name)[0]
        dst[:, slot].copy_(x)
    for name, dst in (("pos", pos), ("score", score), ("H", H), ("z", z)):
        dst[:, slot].copy_(section_view(buf, layout, name)[0])
    length[slot] = section_view(buf, layout, "length")[0, 0].to(length.dtype)


def pack_fields_ref(fields: dict[str, torch.Tensor], length: torch.Tensor, slot_ids: torch.Tensor,
                    layout: PackLayout) -> torch.Tensor:
    """Slots of a slab given by its sections ({name: [L, S, ...]}, every section but length) -> uint8
    [n, record_bytes], each section a plain copy (a quantised slab's codes and scales as they are)."""
    n = slot_ids.numel()
    buf = torch.zeros(n, layout.record_bytes, dtype=torch.uint8, device=length.device)
    for name, _, _ in layout.sections()[:-1]:
        section_view(buf, layout, name).copy_(fields[name][:, slot_ids].transpose(0, 1))
    section_view(buf, layout, "length").copy_(length[slot_ids].to(torch.int32)[:, None])
    return buf


def unpack_fields_ref(record: torch.Tensor, fields: dict[str, torch.Tensor], length: torch.Tensor, slot: int,
                      layout: PackLayout) -> None:
    """One record [record_bytes] -> slab slot `slot` ({name: [L, S, ...]} written in place), plain copies."""
    buf = record.reshape(1, -1)
    for name, _, _ in layout.sections()[:-1]:
        fields[name][:, slot].copy_(section_view(buf, layout, name)[0])
    length[slot] = section_view(buf, layout, "length")[0, 0].to(length.dtype)
