"""Compressed attention over session slots (torch reference; the spec for the Triton kernels).

A slot's cache for one layer holds `length[slot]` compacted entries (post-RoPE keys, values).
Each query attends to (a) its KV head's cached entries, (b) causally to the chunk's own new
keys, and (c) the LESS low-rank state (H, z) that stands in for evicted tokens:

  m' = max(0, max_i s_i)           s_i = q.k_i * scale over (a) and (b)
  o  = (sum_i e^{s_i-m'} v_i + e^{-m'} phi(q)^T H) / (sum_i e^{s_i-m'} + e^{-m'} phi(q)^T z)

(m' >= 0 keeps e^{-m'} finite; it equals LESS.md's formula exactly.) The per-key attention
mass returned for H2O is the sparse softmax e^{s_i-m}/sum_j e^{s_j-m}, i.e. normalised over the
kept tokens only, summed over the GQA group's query heads and over the chunk's queries.
"""

from __future__ import annotations

import torch


def chunk_attention_ref(
    q: torch.Tensor,  # [n, Hq, C, D]
    k_new: torch.Tensor,  # [n, Hkv, C, D]
    v_new: torch.Tensor,  # [n, Hkv, C, D]
    k_cache: torch.Tensor,  # [S, Hkv, B, D]  one layer of the slab
    v_cache: torch.Tensor,  # [S, Hkv, B, D]
    length: torch.Tensor,  # [S] int, valid entries per slot
    slot_ids: torch.Tensor,  # [n] long
    scale: float,
    H: torch.Tensor | None = None,  # [S, Hkv, R, D] fp32
    z: torch.Tensor | None = None,  # [S, Hkv, R] fp32
    phi_q: torch.Tensor | None = None,  # [n, Hq, C, R] fp32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns out [n, Hq, C, D] (q.dtype), mass_cache [n, Hkv, B] fp32, mass_new [n, Hkv, C] fp32."""
    n, Hq, C, D = q.shape
    Hkv, B_cap = k_cache.shape[1], k_cache.shape[2]
    B = max(int(length[slot_ids].max()), 1) if n else 1  # attend over live entries only; pad mass back
    G = Hq // Hkv
    qf = q.float().view(n, Hkv, G, C, D)
    kc, vc = k_cache[slot_ids, :, :B].float(), v_cache[slot_ids, :, :B].float()  # [n, Hkv, B, D]
    s_cache = torch.einsum("nhgcd,nhbd->nhgcb", qf, kc) * scale
    valid = torch.arange(B, device=q.device)[None, :] < length[slot_ids].to(q.device)[:, None]  # [n, B]
    s_cache = s_cache.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    s_new = torch.einsum("nhgcd,nhtd->nhgct", qf, k_new.float()) * scale
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    s_new = s_new.masked_fill(~causal, float("-inf"))
    s = torch.cat([s_cache, s_new], dim=-1)  # [n, Hkv, G, C, B + C]
    m = s.amax(dim=-1, keepdim=True)  # finite: every query sees itself
    use_less = phi_q is not None and H is not None and z is not None
    m_out = m.clamp_min(0.0) if use_less else m
    e = torch.exp(s - m_out)
    num = torch.einsum("nhgct,nhtd->nhgcd", e, torch.cat([vc, v_new.float()], dim=2))
    den = e.sum(dim=-1, keepdim=True)
    if use_less:
        phi = phi_q.float().view(n, Hkv, G, C, -1)
        w = torch.exp(-m_out)  # [n, Hkv, G, C, 1]
        num = num + w * torch.einsum("nhgcr,nhrd->nhgcd", phi, H[slot_ids])
        den = den + w * torch.einsum("nhgcr,nhr->nhgc", phi, z[slot_ids])[..., None]
    out = (num / den).view(n, Hq, C, D).to(q.dtype)
    p = e / e.sum(dim=-1, keepdim=True)  # sparse-normalised probabilities
    mass = p.sum(dim=(2, 3))  # [n, Hkv, B + C]
    mass_cache = torch.zeros(n, Hkv, B_cap, dtype=mass.dtype, device=mass.device)
    mass_cache[..., :B] = mass[..., :B]
    return out, mass_cache, mass[..., B:].contiguous()


def decode_attention_ref(
    q: torch.Tensor,  # [n, Hq, D]
    k_new: torch.Tensor,  # [n, Hkv, D]
    v_new: torch.Tensor,  # [n, Hkv, D]
    k_cache: torch.Tensor,  # [S, Hkv, B, D]
    v_cache: torch.Tensor,
    length: torch.Tensor,  # [S]
    slot_ids: torch.Tensor,  # [n]
    scale: float,
    H: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    phi_q: torch.Tensor | None = None,  # [n, Hq, R]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step: a chunk of length 1. Returns out [n, Hq, D], mass_cache [n, Hkv, B], mass_new [n, Hkv]."""
    out, mc, mn = chunk_attention_ref(
        q[:, :, None], k_new[:, :, None], v_new[:, :, None], k_cache, v_cache, length, slot_ids, scale,
        H, z, None if phi_q is None else phi_q[:, :, None],
    )
    return out[:, :, 0], mc, mn[..., 0]
