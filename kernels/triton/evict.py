"""Launch wrapper for evict-and-absorb: validate, select + compact in Triton, psi of the victims by
torch matmuls (a small MLP on at most C rows per head), absorb into H/z in Triton.

Same signature and results as kernels/reference/evict.py (ties between equal H2O scores at the
cut evict the earliest entry; torch.topk leaves that order unspecified).
"""

from __future__ import annotations

import torch

from lessserve.kernels.reference.evict import EvictionSpec
from lessserve.kernels.reference.lowrank import LessLayerWeights, psi_ref
from lessserve.kernels.triton.checks import (
    TL_TYPES,
    expect,
    expect_device,
    expect_float,
    expect_inner_contiguous,
    expect_shape,
)
from lessserve.kernels.triton.evict_kernels import absorb_kernel, evict_move_kernel, evict_select_kernel
from lessserve.kernels.triton.launch import EVICT_MODES, MAX_MERGED, evict_launches


def _validate(k_cache, v_cache, pos_cache, score_cache, length, slot_ids, k_new, v_new, pos_new,
              mass_cache, mass_new, spec, H, z, psi) -> bool:
    expect(k_cache.dim() == 4, f"k_cache: expected [S, Hkv, B, D], got {tuple(k_cache.shape)}")
    S, Hkv, B, D = k_cache.shape
    expect(k_new.dim() == 4, f"k_new: expected [n, Hkv, C, D], got {tuple(k_new.shape)}")
    n, C = k_new.shape[0], k_new.shape[2]
    expect_shape("k_new", k_new, (n, Hkv, C, D))
    expect_shape("v_new", v_new, (n, Hkv, C, D))
    expect_shape("v_cache", v_cache, (S, Hkv, B, D))
    expect_shape("pos_cache", pos_cache, (S, Hkv, B))
    expect_shape("score_cache", score_cache, (S, Hkv, B))
    expect_shape("length", length, (S,))
    expect_shape("slot_ids", slot_ids, (n,))
    expect_shape("pos_new", pos_new, (n, C))
    expect_shape("mass_cache", mass_cache, (n, Hkv, B))
    expect_shape("mass_new", mass_new, (n, Hkv, C))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        expect_float(name, t)
        expect_inner_contiguous(name, t)
    expect(k_cache.dtype == v_cache.dtype == k_new.dtype == v_new.dtype,
           f"k/v dtypes differ: {k_cache.dtype}, {v_cache.dtype}, {k_new.dtype}, {v_new.dtype}")
    expect(pos_cache.dtype == torch.int32, f"pos_cache: dtype {pos_cache.dtype}, expected int32")
    expect(score_cache.dtype == torch.float32, f"score_cache: dtype {score_cache.dtype}, expected float32")
    for name, t in (("pos_cache", pos_cache), ("score_cache", score_cache)):
        expect_inner_contiguous(name, t)
    expect(spec.mode in EVICT_MODES, f"eviction mode {spec.mode!r}: expected one of {tuple(EVICT_MODES)}")
    expect(spec.budget == B, f"spec.budget={spec.budget} but the cache holds B={B} entries")
    expect(0 <= spec.recent and 0 <= spec.sink and spec.recent + spec.sink <= B,
           f"recent={spec.recent} + sink={spec.sink} must fit in budget {B}")
    expect(B + C <= MAX_MERGED, f"B + C = {B + C} exceeds {MAX_MERGED}")
    expect_device(k_cache.device, v_cache=v_cache, pos_cache=pos_cache, score_cache=score_cache, length=length,
                  slot_ids=slot_ids, k_new=k_new, v_new=v_new, pos_new=pos_new, mass_cache=mass_cache,
                  mass_new=mass_new, H=H, z=z)
    use_less = psi is not None and H is not None and z is not None
    if use_less:
        R = H.shape[2] if H.dim() == 4 else -1
        expect_shape("H", H, (S, Hkv, R, D))
        expect_shape("z", z, (S, Hkv, R))
        expect(H.dtype == z.dtype == torch.float32, "H and z must be float32")
        expect_inner_contiguous("H", H)
        expect_inner_contiguous("z", z)
    return use_less


def evict_absorb(
    k_cache: torch.Tensor,  # [S, Hkv, B, D] written in place
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,  # [S, Hkv, B] int32
    score_cache: torch.Tensor,  # [S, Hkv, B] fp32
    length: torch.Tensor,  # [S] read only
    slot_ids: torch.Tensor,  # [n]
    k_new: torch.Tensor,  # [n, Hkv, C, D]
    v_new: torch.Tensor,
    pos_new: torch.Tensor,  # [n, C]
    mass_cache: torch.Tensor,  # [n, Hkv, B]
    mass_new: torch.Tensor,  # [n, Hkv, C]
    spec: EvictionSpec,
    H: torch.Tensor | None = None,  # [S, Hkv, R, D] fp32, in place
    z: torch.Tensor | None = None,  # [S, Hkv, R] fp32, in place
    psi: LessLayerWeights | None = None,
) -> torch.Tensor:
    """Returns the new length per slot [n] int32."""
    use_less = _validate(k_cache, v_cache, pos_cache, score_cache, length, slot_ids, k_new, v_new, pos_new,
                         mass_cache, mass_new, spec, H, z, psi)
    S, Hkv, B, D = k_cache.shape
    n, C = k_new.shape[0], k_new.shape[2]
    dev = k_cache.device
    ln = length.to(torch.int32).contiguous() if length.dtype != torch.int32 else length.contiguous()
    slot_ids = slot_ids.to(torch.int64).contiguous()
    new_len = (ln[slot_ids] + C).clamp(max=B).to(torch.int32)  # [n]
    if n == 0:
        return new_len
    mass_cache = mass_cache.float().contiguous()
    mass_new = mass_new.float().contiguous()
    pos_new = pos_new.to(torch.int32).contiguous()
    R = H.shape[2] if use_less else 0
    select, move, *absorb = evict_launches(n, Hkv, B, C, D, R, spec.mode, TL_TYPES[k_cache.dtype], use_less)
    BLOCK_T = select.constexprs["BLOCK_T"]
    code = torch.empty((n, Hkv, BLOCK_T), dtype=torch.int32, device=dev)  # scratch
    evict_select_kernel[select.grid](
        score_cache, mass_cache, mass_new, ln, slot_ids, code,
        C, B, spec.recent, spec.sink, score_cache.stride(0), score_cache.stride(1),
        **select.options,
    )
    if use_less:
        vk = torch.zeros((n, Hkv, C, D), dtype=k_cache.dtype, device=dev)  # victims, zero rows unused
        vv = torch.zeros((n, Hkv, C, D), dtype=v_cache.dtype, device=dev)
        used = torch.zeros((n, Hkv, C), dtype=torch.float32, device=dev)
    else:
        vk = vv = used = code  # placeholders, never written
    evict_move_kernel[move.grid](
        k_cache, v_cache, pos_cache, score_cache, ln, slot_ids,
        k_new, v_new, pos_new, mass_cache, mass_new, code,
        vk, vv, used,
        C, B, D, BLOCK_T,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *pos_cache.stride()[:2], *score_cache.stride()[:2],
        *k_new.stride()[:3], *v_new.stride()[:3], pos_new.stride(0),
        **move.options,
    )
    for ab in absorb:  # with LESS: psi of the victims by torch matmuls, then H += f^T v, z += sum f
        f = (psi_ref(vk, psi) * used[..., None]).contiguous()  # [n, Hkv, C, R] fp32
        absorb_kernel[ab.grid](f, vv, H, z, slot_ids, C, R, D, *H.stride()[:3], *z.stride()[:2], **ab.options)
    return new_len
