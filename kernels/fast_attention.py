"""Fast torch attention over session slots (the `torch` implementation; kernels/reference/ is the spec).

Same results as `reference/attention.py` within the tolerance table (docs/kernels.md), computed
with batched matmuls instead of einsums over a [n, Hkv, G, C, B + C] tensor:

- the GQA group's query heads and the chunk's queries are the rows of one matmul per KV head
  (`[G*C, D] @ [D, Lb + C]`), so each cached key is read once per group;
- queries are processed in blocks (`q_block` chunk positions), each against the cache and the
  chunk's keys up to the block's last query only (the causal part is never computed whole);
- one normalisation: probabilities `p = e / l` give the per-key mass (summed over rows) and the
  attention output `p @ V`; the LESS term joins with the reference's shift `m' = max(m, 0)`:
  `o = (a (p @ V) + b phi^T H) / (a + b phi^T z)`, `a = l e^{m - m'}`, `b = e^{-m'}`;
- `max_len` bounds the cache rows read (an upper bound on every slot's length, known on the host:
  no device sync); None reads the whole capacity (static shapes, e.g. CUDA graphs).

`full_attention_views` is the uncompressed path: SDPA per slot over views of the slab rows (no
gather copy, no mass), the same work a static full-cache server does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

Q_BLOCK = 512  # chunk positions per query block: bounds the score matrix at Hq * 512 * (Lb + C) floats


class Fold(NamedTuple):
    """A quantised slot's rows given by their codes (kernels/reference/kv_quant.py): row i of kcat /
    vcat holds integer codes u, key i is k_center + zero + scale * u per channel group, value i
    zero + scale * u. attend_cat folds the parameters into the product instead of dequantising the
    rows: scores = sum_g scale_g (q_g . u_g) + sum_g zero_g sum(q_g) + q . k_center, and the output
    sum_g (p * v_scale_g) @ u_g + p @ v_zero_g. NG = channel groups."""

    ks: torch.Tensor  # [n, Hkv, Lb + C, NG]
    kz: torch.Tensor
    vs: torch.Tensor
    vz: torch.Tensor
    kc: torch.Tensor  # [n, Hkv, D]


def _fold_scores(qb: torch.Tensor, K: torch.Tensor, f: Fold, Lkb: int) -> torch.Tensor:
    """qb [n, Hkv, M, D] queries, K [n, Hkv, Lkb, D] codes -> raw scores [n, Hkv, M, Lkb]. The per-group
    products q_g . u_g come from one matmul of the queries masked to each group ([NG * M, D], zeros
    outside group g) with the codes as they lie: no permuted copy of the codes."""
    NG, D = f.ks.shape[-1], qb.shape[-1]
    groups = torch.eye(NG, dtype=qb.dtype, device=qb.device).repeat_interleave(D // NG, dim=1)  # [NG, D]
    qblock = (qb[:, :, None] * groups[:, None, :]).flatten(2, 3)  # [n, Hkv, NG * M, D]
    per = torch.matmul(qblock, K.transpose(-1, -2)).unflatten(2, (NG, -1))  # [n, Hkv, NG, M, Lkb]
    s = (per * f.ks[:, :, :Lkb].float().transpose(-1, -2)[:, :, :, None, :]).sum(dim=2)
    s += torch.matmul(qb.unflatten(-1, (NG, -1)).sum(dim=-1), f.kz[:, :, :Lkb].float().transpose(-1, -2))
    return s + torch.matmul(qb, f.kc[..., None])  # + q . k_center, the same for every key of the head


def _fold_values(p: torch.Tensor, V: torch.Tensor, f: Fold, Lkb: int) -> torch.Tensor:
    """p [n, Hkv, M, Lkb] probabilities, V [n, Hkv, Lkb, D] codes -> out [n, Hkv, M, D]."""
    NG = f.vs.shape[-1]
    pv = p[:, :, None] * f.vs[:, :, :Lkb].float().permute(0, 1, 3, 2)[:, :, :, None, :]  # [n, Hkv, NG, M, Lkb]
    o = torch.matmul(pv, V.unflatten(-1, (NG, -1)).transpose(2, 3))  # [n, Hkv, NG, M, g]
    o = o + torch.matmul(p, f.vz[:, :, :Lkb].float()).transpose(2, 3)[..., None]
    return o.transpose(2, 3).flatten(-2)


def attend_cat(
    q: torch.Tensor,  # [n, Hq, C, D]
    kcat: torch.Tensor,  # [n, Hkv, Lb + C, D]  cache rows [0, Lb) then the chunk's keys
    vcat: torch.Tensor,  # [n, Hkv, Lb + C, D]
    valid_cache: torch.Tensor,  # [n, Lb] bool: row < the slot's length
    scale: float,
    H: torch.Tensor | None = None,  # [n, Hkv, R, D] fp32 (already selected by slot)
    z: torch.Tensor | None = None,  # [n, Hkv, R]
    phi_q: torch.Tensor | None = None,  # [n, Hq, C, R]
    q_block: int = Q_BLOCK,
    fold: Fold | None = None,  # kcat / vcat are a quantised slot's codes, with these parameters
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk over [cache | chunk] in one layout. Returns out [n, Hq, C, D] (q.dtype)
    and mass [n, Hkv, Lb + C] fp32 (sparse-normalised probabilities summed over group and queries)."""
    n, Hq, C, D = q.shape
    Hkv, Lk = kcat.shape[1], kcat.shape[2]
    Lb, G = Lk - C, Hq // Hkv
    use_less = phi_q is not None and H is not None and z is not None
    K, V = kcat.float(), vcat.float()
    qg = q.float().view(n, Hkv, G, C, D)
    phig = phi_q.float().view(n, Hkv, G, C, -1) if use_less else None
    inv_cache = ~valid_cache[:, None, None, None, :]  # [n, 1, 1, 1, Lb]
    mass = torch.zeros(n, Hkv, Lk, dtype=torch.float32, device=q.device)
    outs = []
    for c0 in range(0, C, q_block):
        c1 = min(C, c0 + q_block)
        Q, Lkb = c1 - c0, Lb + c1
        qb = qg[:, :, :, c0:c1].reshape(n, Hkv, G * Q, D)
        s = torch.matmul(qb, K[:, :, :Lkb].transpose(-1, -2)) if fold is None else _fold_scores(qb, K[:, :, :Lkb],
                                                                                               fold, Lkb)
        s = s.mul_(scale).view(n, Hkv, G, Q, Lkb)
        if Lb:
            s[..., :Lb].masked_fill_(inv_cache, float("-inf"))
        if c1 > 1:
            later = torch.arange(c1, device=q.device)[None, :] > torch.arange(c0, c1, device=q.device)[:, None]
            s[..., Lb:].masked_fill_(later, float("-inf"))  # [Q, c1]: the chunk's keys after each query
        m = s.amax(dim=-1, keepdim=True)  # finite: every query sees itself
        p = s.sub_(m).exp_()
        den = p.sum(dim=-1, keepdim=True)
        p = p.div_(den)
        mass[..., :Lkb] += p.sum(dim=(2, 3))
        pm = p.view(n, Hkv, G * Q, Lkb)
        o = (torch.matmul(pm, V[:, :, :Lkb]) if fold is None else _fold_values(pm, V[:, :, :Lkb], fold, Lkb)
             ).view(n, Hkv, G, Q, D)
        if use_less:
            m2 = m.clamp_min(0.0)
            a, b = den * torch.exp(m - m2), torch.exp(-m2)  # [n, Hkv, G, Q, 1]
            ph = phig[:, :, :, c0:c1]
            num = a * o + b * torch.matmul(ph, H[:, :, None])
            den = a + b * torch.matmul(ph, z[:, :, None, :, None])
            o = num / den
        outs.append(o)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
    return out.reshape(n, Hq, C, D).to(q.dtype), mass


def gather_cat(cache: torch.Tensor, slot_ids: torch.Tensor, new: torch.Tensor, max_len: int | None) -> torch.Tensor:
    """[cache rows [0, Lb) of each slot | the chunk's rows]: cache [S, Hkv, B, ...], new [n, Hkv, C, ...]."""
    Lb = cache.shape[2] if max_len is None else max(0, min(max_len, cache.shape[2]))
    return torch.cat([cache[:, :, :Lb].index_select(0, slot_ids), new.to(cache.dtype)], dim=2)


def valid_rows(length: torch.Tensor, slot_ids: torch.Tensor, Lb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln [n] long: each slot's length, valid [n, Lb] bool: rows below it)."""
    ln = length[slot_ids].long()
    return ln, torch.arange(Lb, device=ln.device)[None, :] < ln[:, None]


class Cat(NamedTuple):
    """[cache | chunk] of the batch's slots: k / v [n, Hkv, Lb + C, D], lengths [n], valid [n, Lb]."""

    k: torch.Tensor
    v: torch.Tensor
    ln: torch.Tensor
    valid: torch.Tensor
    Lb: int


def attend_slots(q, k_new, v_new, k_cache, v_cache, length, slot_ids, scale, H, z, phi_q,
                 max_len) -> tuple[torch.Tensor, torch.Tensor, Cat]:
    """Gather each slot's cache rows beside the chunk and attend (the LESS term only with phi(q),
    H and z all given): (out [n, Hq, C, D], mass [n, Hkv, Lb + C], the gathered Cat)."""
    kcat, vcat = gather_cat(k_cache, slot_ids, k_new, max_len), gather_cat(v_cache, slot_ids, v_new, max_len)
    Lb = kcat.shape[2] - q.shape[2]
    ln, valid = valid_rows(length, slot_ids, Lb)
    use_less = phi_q is not None and H is not None and z is not None
    out, mass = attend_cat(q, kcat, vcat, valid, scale, H[slot_ids] if use_less else None,
                           z[slot_ids] if use_less else None, phi_q if use_less else None)
    return out, mass, Cat(kcat, vcat, ln, valid, Lb)


def chunk_attention_fast(
    q: torch.Tensor,  # [n, Hq, C, D]
    k_new: torch.Tensor,  # [n, Hkv, C, D]
    v_new: torch.Tensor,
    k_cache: torch.Tensor,  # [S, Hkv, B, D]
    v_cache: torch.Tensor,
    length: torch.Tensor,  # [S]
    slot_ids: torch.Tensor,  # [n]
    scale: float,
    H: torch.Tensor | None = None,  # [S, Hkv, R, D]
    z: torch.Tensor | None = None,  # [S, Hkv, R]
    phi_q: torch.Tensor | None = None,  # [n, Hq, C, R]
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`chunk_attention_ref`'s contract: out [n, Hq, C, D], mass_cache [n, Hkv, B] fp32, mass_new [n, Hkv, C]."""
    B = k_cache.shape[2]
    out, mass, cat = attend_slots(q, k_new, v_new, k_cache, v_cache, length, slot_ids, scale, H, z, phi_q, max_len)
    Lb = cat.Lb
    mass_cache = torch.zeros(q.shape[0], k_cache.shape[1], B, dtype=torch.float32, device=q.device)
    mass_cache[..., :Lb] = mass[..., :Lb]
    return out, mass_cache, mass[..., Lb:].contiguous()


def decode_attention_fast(q, k_new, v_new, k_cache, v_cache, length, slot_ids, scale, H=None, z=None, phi_q=None,
                          max_len: int | None = None):
    """`decode_attention_ref`'s contract: q [n, Hq, D] -> out [n, Hq, D], mass_cache [n, Hkv, B], mass_new [n, Hkv]."""
    out, mc, mn = chunk_attention_fast(q[:, :, None], k_new[:, :, None], v_new[:, :, None], k_cache, v_cache, length,
                                       slot_ids, scale, H, z, None if phi_q is None else phi_q[:, :, None], max_len)
    return out[:, :, 0], mc, mn[..., 0]


def full_attention_views(
    q: torch.Tensor,  # [n, Hq, C, D]
    k_cache: torch.Tensor,  # [S, Hkv, B, D]  the chunk already written at rows [len, len + C)
    v_cache: torch.Tensor,
    slots: list[int],  # host slot ids
    lens: list[int],  # host lengths before the chunk
) -> torch.Tensor:
    """Full causal attention per slot over views of its slab rows [0, len + C) (SDPA, no copy)."""
    C, out = q.shape[2], []
    for i, (s, ln) in enumerate(zip(slots, lens, strict=True)):
        k, v = k_cache[s : s + 1, :, : ln + C], v_cache[s : s + 1, :, : ln + C]
        if C == 1 or ln == 0:
            o = F.scaled_dot_product_attention(q[i : i + 1], k, v, is_causal=C > 1, enable_gqa=True)
        else:
            mask = torch.ones(C, ln + C, dtype=torch.bool, device=q.device).tril(ln)
            o = F.scaled_dot_product_attention(q[i : i + 1], k, v, attn_mask=mask, enable_gqa=True)
        out.append(o)
    return out[0] if len(out) == 1 else torch.cat(out, dim=0)
