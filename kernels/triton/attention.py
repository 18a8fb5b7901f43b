"""Launch wrappers for compressed attention: validate inputs, allocate outputs, pick the mass path.

Same signatures and results as kernels/reference/attention.py; `chunk_attention_quant` those of
kernels/reference/quant_slots.py (a quantised slab's codes read in place).
"""

from __future__ import annotations

import torch

from lessserve.kernels.reference.kv_quant import QuantKV, QuantRows
from lessserve.kernels.triton.attention_kernels import attn_fwd_kernel, attn_mass_kernel
from lessserve.kernels.triton.checks import (
    TL_TYPES,
    expect,
    expect_device,
    expect_float,
    expect_inner_contiguous,
    expect_shape,
    interpreting,
    new_output,
)
from lessserve.kernels.triton.launch import FUSED_MAX_ROWS, KV_CODES, KV_GROUP, attention_launches


def _validate(q, k_new, v_new, k_cache, v_cache, length, slot_ids, H, z, phi_q) -> bool:
    expect(q.dim() == 4, f"q: expected [n, Hq, C, D], got {tuple(q.shape)}")
    expect(k_cache.dim() == 4, f"k_cache: expected [S, Hkv, B, D], got {tuple(k_cache.shape)}")
    Hq, Hkv = q.shape[1], k_cache.shape[1]
    expect(Hkv > 0 and Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    expect_shape("v_cache", v_cache, tuple(k_cache.shape))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        expect_float(name, t)
        expect_inner_contiguous(name, t)
    expect(k_cache.dtype == v_cache.dtype == q.dtype, f"q/k/v dtypes differ: {q.dtype}, {k_cache.dtype}, "
                                                      f"{v_cache.dtype}")
    expect(k_cache.shape[3] == q.shape[3], f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}: head_dim differs")
    return _validate_step(q, k_new, v_new, *k_cache.shape[:3], length, slot_ids, H, z, phi_q, k_cache, v_cache)


def _validate_quant(q, new: QuantRows, kv: QuantKV) -> None:
    expect(q.dim() == 4, f"q: expected [n, Hq, C, D], got {tuple(q.shape)}")
    expect(kv.bits in KV_CODES, f"kv bits {kv.bits}: expected one of {tuple(KV_CODES)}")
    expect(kv.k.dim() == 4, f"codes: expected [S, Hkv, B, Dc], got {tuple(kv.k.shape)}")
    (n, _, C, D), (S, Hkv, B, _) = q.shape, kv.k.shape
    expect(kv.bits == 8 or D % 2 == 0, f"4-bit codes need an even head_dim, got {D}")
    Dc, group = (D if kv.bits == 8 else D // 2), min(KV_GROUP, D)
    expect(D % group == 0, f"head_dim {D} is not a multiple of the channel group {group}")
    NG = D // group
    for label, rows_of, fields in (("", (S, Hkv, B), kv[:6]), ("chunk ", (n, Hkv, C), new)):
        for name, codes, scale, zero in ((label + "k", *fields[:3]), (label + "v", *fields[3:6])):
            expect_shape(f"{name} codes", codes, (*rows_of, Dc))
            expect(codes.dtype == torch.uint8, f"{name} codes: dtype {codes.dtype}, expected uint8")
            expect_inner_contiguous(f"{name} codes", codes)
            for what, t in (("scales", scale), ("zeros", zero)):
                expect_shape(f"{name} {what}", t, (*rows_of, NG))
                expect(t.dtype == torch.float16, f"{name} {what}: dtype {t.dtype}, expected float16")
                expect(t.stride()[2:] == (NG, 1) and t.stride()[:2] == fields[1].stride()[:2],
                       f"{name} {what}: rows of NG params must be contiguous, laid out as the scales")
    expect_shape("key center", kv.kc, (S, Hkv, D))
    expect(kv.kc.dtype == torch.float32, f"key center: dtype {kv.kc.dtype}, expected float32")
    expect_inner_contiguous("key center", kv.kc)
    expect_device(q.device, k_codes=kv.k, v_codes=kv.v, k_scale=kv.ks, k_zero=kv.kz, v_scale=kv.vs, v_zero=kv.vz,
                  k_center=kv.kc, chunk_k=new.k, chunk_v=new.v, chunk_ks=new.ks, chunk_kz=new.kz, chunk_vs=new.vs,
                  chunk_vz=new.vz)


def _validate_step(q, k_new, v_new, S, Hkv, B, length, slot_ids, H, z, phi_q, k_cache, v_cache) -> bool:
    expect(q.dim() == 4, f"q: expected [n, Hq, C, D], got {tuple(q.shape)}")
    n, Hq, C, D = q.shape
    expect(Hkv > 0 and Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    expect(C >= 1 and D <= 256, f"C={C} must be >= 1 and head_dim {D} <= 256")
    expect_shape("length", length, (S,))
    expect_shape("slot_ids", slot_ids, (n,))
    expect_float("q", q)
    expect_inner_contiguous("q", q)
    if k_new is not None:  # native chunk rows (a quantised chunk is checked by _validate_quant)
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            expect_shape(name, t, (n, Hkv, C, D))
            expect_float(name, t)
            expect_inner_contiguous(name, t)
        expect(k_new.dtype == v_new.dtype == q.dtype, f"q/k/v dtypes differ: {q.dtype}, {k_new.dtype}, "
                                                      f"{v_new.dtype}")
    expect(not length.dtype.is_floating_point and not slot_ids.dtype.is_floating_point,
           "length and slot_ids must be integer tensors")
    expect_device(q.device, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, length=length,
                  slot_ids=slot_ids, H=H, z=z, phi_q=phi_q)
    use_less = phi_q is not None and H is not None and z is not None
    if use_less:
        R = H.shape[2] if H.dim() == 4 else -1
        expect_shape("H", H, (S, Hkv, R, D))
        expect_shape("z", z, (S, Hkv, R))
        expect_shape("phi_q", phi_q, (n, Hq, C, R))
        for name, t in (("H", H), ("z", z), ("phi_q", phi_q)):
            expect(t.dtype == torch.float32, f"{name}: dtype {t.dtype}, expected float32")
            expect_inner_contiguous(name, t)
    return use_less


def chunk_attention(q, k_new, v_new, k_cache, v_cache, length, slot_ids, scale, H=None, z=None, phi_q=None):
    """q [n, Hq, C, D] -> out [n, Hq, C, D], mass_cache [n, Hkv, B] fp32, mass_new [n, Hkv, C] fp32."""
    use_less = _validate(q, k_new, v_new, k_cache, v_cache, length, slot_ids, H, z, phi_q)
    return _attention(q, k_new, v_new, k_cache, v_cache, None, length, slot_ids, scale, H, z, phi_q, use_less)


def chunk_attention_quant(q, new: QuantRows, kv: QuantKV, length, slot_ids, scale, H=None, z=None, phi_q=None):
    """`chunk_attention_quant_ref`'s contract: the slots' and the chunk's codes and scales are read
    in place by the kernel (no dequantised copy)."""
    _validate_quant(q, new, kv)
    use_less = _validate_step(q, None, None, *kv.k.shape[:3], length, slot_ids, H, z, phi_q, kv.k, kv.v)
    return _attention(q, new.k, new.v, kv.k, kv.v, (kv, new), length, slot_ids, scale, H, z, phi_q, use_less)


def _attention(q, k_new, v_new, k_cache, v_cache, quant: tuple[QuantKV, QuantRows] | None, length, slot_ids, scale,
               H, z, phi_q, use_less: bool):
    n, Hq, C, D = q.shape
    S, Hkv, B, _ = k_cache.shape
    G, dev = Hq // Hkv, q.device
    out = new_output((n, Hq, C, D), q.dtype, dev)
    mass_cache = new_output((n, Hkv, B), torch.float32, dev)
    mass_new = new_output((n, Hkv, C), torch.float32, dev)
    if n == 0:
        return out, mass_cache, mass_new
    R = H.shape[2] if use_less else 0
    bits = quant[0].bits if quant is not None else 0
    fwd, *mass = attention_launches(n, Hq, Hkv, C, B, D, R, TL_TYPES[q.dtype], use_less, interpreting(), bits)
    GC, fused = G * C, fwd.constexprs["FUSED_MASS"]
    length = length.to(torch.int32) if length.dtype != torch.int32 else length
    slot_ids = slot_ids.to(torch.int64).contiguous()
    if use_less:
        Hp, zp, pp = H, z, phi_q
        sH, sz, sp = H.stride()[:3], z.stride()[:2], phi_q.stride()[:3]
    else:
        Hp, zp, pp = q, q, q  # placeholders, never read
        sH, sz, sp = (0, 0, 0), (0, 0), (0, 0, 0)
    if quant is not None:  # the chunk's and the slots' scales / zeros, the slots' key centers
        kv, new = quant
        qp = (*new[1:3], *new[4:6], *kv[1:3], *kv[4:6], kv.kc)
        sq = (*new.ks.stride()[:2], *kv.ks.stride()[:2], *kv.kc.stride()[:2])
    else:
        qp, sq = (q,) * 9, (0,) * 6  # placeholders, never read
    if fused:
        logits = torch.empty((n, Hkv, GC, B + C), dtype=torch.float32, device=dev)  # scratch
        m = l_ = logits
    else:
        logits = q  # placeholder
        m = torch.empty((n, Hkv, GC), dtype=torch.float32, device=dev)
        l_ = torch.empty((n, Hkv, GC), dtype=torch.float32, device=dev)
    attn_fwd_kernel[fwd.grid](
        q, k_new, v_new, k_cache, v_cache, length, slot_ids, Hp, zp, pp, *qp,
        out, m, l_, logits, mass_cache, mass_new,
        C, G, B, D, R, float(scale),
        *q.stride()[:3], *out.stride()[:3],
        *k_new.stride()[:3], *v_new.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        *sH, *sz, *sp, *sq,
        **fwd.options,
    )
    for ml in mass:  # G*C > 64: the mass from (m, l), one block of keys per program
        nb_cache = -(-B // ml.constexprs["BLOCK_N"])
        attn_mass_kernel[ml.grid](
            q, k_new, k_cache, length, slot_ids, m, l_, mass_cache, mass_new, qp[0], qp[1], qp[4], qp[5], qp[8],
            C, G, B, D, float(scale), nb_cache,
            *q.stride()[:3], *k_new.stride()[:3], *k_cache.stride()[:3], *sq,
            **ml.options,
        )
    return out, mass_cache, mass_new


def decode_attention(q, k_new, v_new, k_cache, v_cache, length, slot_ids, scale, H=None, z=None, phi_q=None):
    """q [n, Hq, D] -> out [n, Hq, D], mass_cache [n, Hkv, B], mass_new [n, Hkv]: one fused pass."""
    expect(q.dim() == 3, f"q: expected [n, Hq, D], got {tuple(q.shape)}")
    expect(k_cache.dim() == 4 and q.shape[1] // max(k_cache.shape[1], 1) <= FUSED_MAX_ROWS,
           "decode supports GQA groups up to 64")
    out, mc, mn = chunk_attention(
        q[:, :, None], k_new[:, :, None], v_new[:, :, None], k_cache, v_cache, length, slot_ids, scale,
        H, z, None if phi_q is None else phi_q[:, :, None])
    return out[:, :, 0], mc, mn[..., 0]
