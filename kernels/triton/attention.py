"""Launch wrappers for compressed attention: validate inputs, allocate outputs, pick the mass path.

Same signatures and results as kernels/reference/attention.py.
"""

from __future__ import annotations

import torch

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
from lessserve.kernels.triton.launch import FUSED_MAX_ROWS, attention_launches


def _validate(q, k_new, v_new, k_cache, v_cache, length, slot_ids, H, z, phi_q) -> bool:
    expect(q.dim() == 4, f"q: expected [n, Hq, C, D], got {tuple(q.shape)}")
    n, Hq, C, D = q.shape
    expect(k_cache.dim() == 4, f"k_cache: expected [S, Hkv, B, D], got {tuple(k_cache.shape)}")
    S, Hkv, B, _ = k_cache.shape
    expect(Hkv > 0 and Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    expect(C >= 1 and D <= 256, f"C={C} must be >= 1 and head_dim {D} <= 256")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        expect_shape(name, t, (n, Hkv, C, D))
    expect_shape("v_cache", v_cache, (S, Hkv, B, D))
    expect_shape("length", length, (S,))
    expect_shape("slot_ids", slot_ids, (n,))
    for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache)):
        expect_float(name, t)
        expect_inner_contiguous(name, t)
    expect(k_new.dtype == k_cache.dtype == v_new.dtype == v_cache.dtype == q.dtype,
           f"q/k/v dtypes differ: {q.dtype}, {k_new.dtype}, {v_new.dtype}, {k_cache.dtype}, {v_cache.dtype}")
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
    n, Hq, C, D = q.shape
    S, Hkv, B, _ = k_cache.shape
    G, dev = Hq // Hkv, q.device
    out = new_output((n, Hq, C, D), q.dtype, dev)
    mass_cache = new_output((n, Hkv, B), torch.float32, dev)
    mass_new = new_output((n, Hkv, C), torch.float32, dev)
    if n == 0:
        return out, mass_cache, mass_new
    R = H.shape[2] if use_less else 0
    fwd, *mass = attention_launches(n, Hq, Hkv, C, B, D, R, TL_TYPES[q.dtype], use_less, interpreting())
    GC, fused = G * C, fwd.constexprs["FUSED_MASS"]
    length = length.to(torch.int32) if length.dtype != torch.int32 else length
    slot_ids = slot_ids.to(torch.int64).contiguous()
    if use_less:
        Hp, zp, pp = H, z, phi_q
        sH, sz, sp = H.stride()[:3], z.stride()[:2], phi_q.stride()[:3]
    else:
        Hp, zp, pp = q, q, q  # placeholders, never read
        sH, sz, sp = (0, 0, 0), (0, 0), (0, 0, 0)
    if fused:
        logits = torch.empty((n, Hkv, GC, B + C), dtype=torch.float32, device=dev)  # scratch
        m = l_ = logits
    else:
        logits = q  # placeholder
        m = torch.empty((n, Hkv, GC), dtype=torch.float32, device=dev)
        l_ = torch.empty((n, Hkv, GC), dtype=torch.float32, device=dev)
    attn_fwd_kernel[fwd.grid](
        q, k_new, v_new, k_cache, v_cache, length, slot_ids, Hp, zp, pp,
        out, m, l_, logits, mass_cache, mass_new,
        C, G, B, D, R, float(scale),
        *q.stride()[:3], *out.stride()[:3],
        *k_new.stride()[:3], *v_new.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        *sH, *sz, *sp,
        **fwd.options,
    )
    for ml in mass:  # G*C > 64: the mass from (m, l), one block of keys per program
        nb_cache = -(-B // ml.constexprs["BLOCK_N"])
        attn_mass_kernel[ml.grid](
            q, k_new, k_cache, length, slot_ids, m, l_, mass_cache, mass_new,
            C, G, B, D, float(scale), nb_cache,
            *q.stride()[:3], *k_new.stride()[:3], *k_cache.stride()[:3],
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
