"""Launch wrappers for session pack / unpack, same signatures and layout as reference/pack.py.

Keys and values with quant="int8" go through the Triton codec kernels, reading (pack) or writing
(unpack) the layer-major slab in place through the slot index: no gather copy of the slab. With
quant="none", and for the small fp32 / int32 sections (pos, score, H, z, length), the sections are
plain device-to-device copies done by torch (`copy_`), which is already a bandwidth-bound memcpy.
"""

from __future__ import annotations

import torch

from lessserve.kernels.reference.pack import PackError, PackLayout, section_view
from lessserve.kernels.triton.checks import expect_device, expect_float
from lessserve.kernels.triton.quant import dequantize_rows, quantize_rows

_FIELDS = ("pos", "score", "H", "z")


def _check_slab(k, v, pos, score, H, z, length) -> PackLayout:
    for name, t in (("k", k), ("v", v)):
        expect_float(name, t)
        if t.stride(-1) != 1:
            raise PackError(f"{name}: last dimension must be contiguous")
    if v.shape != k.shape or pos.shape != k.shape[:4] or score.shape != k.shape[:4]:
        raise PackError(f"slab shapes disagree: k {tuple(k.shape)}, v {tuple(v.shape)}, pos {tuple(pos.shape)}, "
                        f"score {tuple(score.shape)}")
    expect_device(k.device, v=v, pos=pos, score=score, H=H, z=z, length=length)
    return PackLayout.of(k, H, "none")


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[X, L, Hkv, B, D] -> [X, L, Hkv*B, D] (a view: raises rather than copy)."""
    return t.view(t.shape[0], t.shape[1], -1, t.shape[-1])


def _scales(t: torch.Tensor) -> torch.Tensor:
    """[n, L, Hkv, B] -> [n, L, Hkv*B] view."""
    return t.view(t.shape[0], t.shape[1], -1)


def pack_slots(k, v, pos, score, H, z, length, slot_ids, quant: str = "none") -> torch.Tensor:
    """Slots slot_ids [n] of a layer-major slab -> uint8 [n, record_bytes]."""
    _check_slab(k, v, pos, score, H, z, length)
    layout = PackLayout.of(k, H, quant)
    n = slot_ids.numel()
    buf = torch.zeros(n, layout.record_bytes, dtype=torch.uint8, device=k.device)  # padding zeroed
    slot_ids = slot_ids.to(device=k.device, dtype=torch.long).contiguous()
    for name, src in (("k", k), ("v", v)):
        if quant == "int8":
            quantize_rows(_as_rows(src.transpose(0, 1)), slot_ids,
                          _as_rows(section_view(buf, layout, name)),
                          _scales(section_view(buf, layout, name + "_scale")))
        else:
            section_view(buf, layout, name).copy_(src[:, slot_ids].transpose(0, 1))
    for name in _FIELDS:
        src = {"pos": pos, "score": score, "H": H, "z": z}[name]
        section_view(buf, layout, name).copy_(src[:, slot_ids].transpose(0, 1))
    section_view(buf, layout, "length").copy_(length[slot_ids].to(torch.int32)[:, None])
    return buf


def unpack_slot(record, k, v, pos, score, H, z, length, slot: int, quant: str = "none") -> None:
    """One record [record_bytes] uint8 -> slab slot `slot`, in place."""
    _check_slab(k, v, pos, score, H, z, length)
    layout = PackLayout.of(k, H, quant)
    buf = record.to(k.device, non_blocking=True).reshape(1, -1)  # a record may come from host memory
    sel = torch.tensor([slot], dtype=torch.long, device=k.device)
    for name, dst in (("k", k), ("v", v)):
        if quant == "int8":
            dequantize_rows(_as_rows(section_view(buf, layout, name)),
                            _scales(section_view(buf, layout, name + "_scale")),
                            _as_rows(dst.transpose(0, 1)), sel)
        else:
            dst[:, slot].copy_(section_view(buf, layout, name)[0])
    for name in _FIELDS:
        dst = {"pos": pos, "score": score, "H": H, "z": z}[name]
        dst[:, slot].copy_(section_view(buf, layout, name)[0])
    length[slot] = section_view(buf, layout, "length")[0, 0].to(length.dtype)
