"""Fast torch evict-and-absorb and the whole compressed step (the `torch` implementation;
kernels/reference/evict.py is the spec).

The merged sequence is never gathered into position order: entries are ranked where they lie,
in the [cache rows [0, Lb) | chunk] layout the attention already built, by their merged index
(a cache row j < length keeps j, chunk entry t becomes length + t, rows in [length, Lb) are
invalid). One top-k per (slot, KV head) picks the victims (the lowest priorities, at most C once a
slot is full; ties evict the newer entry) and a prefix count puts the kept ones back in merged
order: psi runs on the victims only, at most C rows per (slot, head). No host synchronisation
anywhere (CUDA-graph safe).
`append` is the no-eviction case (the caller knows every slot has room).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lessserve.kernels.fast_attention import attend_slots, full_attention_views, gather_cat, valid_rows
from lessserve.kernels.reference.evict import PIN_SCORE, EvictionSpec
from lessserve.kernels.reference.lowrank import LessLayerWeights, psi_ref


def evict_cat(
    k_cache: torch.Tensor,  # [S, Hkv, B, D]  written in place
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,  # [S, Hkv, B] int32
    score_cache: torch.Tensor,  # [S, Hkv, B] fp32
    slot_ids: torch.Tensor,  # [n]
    ln: torch.Tensor,  # [n] long: lengths before the chunk
    kcat: torch.Tensor,  # [n, Hkv, Lb + C, D]
    vcat: torch.Tensor,
    pos_new: torch.Tensor,  # [n, C]
    mass: torch.Tensor,  # [n, Hkv, Lb + C] this step's attention mass in the same layout
    spec: EvictionSpec,
    H: torch.Tensor | None = None,  # [S, Hkv, R, D] written in place
    z: torch.Tensor | None = None,
    psi: LessLayerWeights | None = None,
) -> torch.Tensor:
    """Merge, keep `budget` per (slot, head), absorb the victims, compact. Returns new lengths [n] int32."""
    return evict_rows(((k_cache, kcat), (v_cache, vcat)), pos_cache, score_cache, slot_ids, ln, pos_new, mass, spec,
                      H, z, psi, victims=lambda idx: (take_rows(kcat, idx), take_rows(vcat, idx)))


def evict_rows(
    rows: tuple[tuple[torch.Tensor, torch.Tensor], ...],  # (cache [S, Hkv, B, ...], [cache | chunk] [n, Hkv, Lk, ...])
    pos_cache: torch.Tensor,  # [S, Hkv, B] int32
    score_cache: torch.Tensor,  # [S, Hkv, B] fp32
    slot_ids: torch.Tensor,  # [n]
    ln: torch.Tensor,  # [n] long: lengths before the chunk
    pos_new: torch.Tensor,  # [n, C]
    mass: torch.Tensor,  # [n, Hkv, Lk] this step's attention mass in the [cache | chunk] layout
    spec: EvictionSpec,
    H: torch.Tensor | None,
    z: torch.Tensor | None,
    psi: LessLayerWeights | None,
    victims: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """evict_cat over any per-entry fields moved together (native k and v, or a quantised slot's codes
    and scales); `victims(idx [n, Hkv, V])` gives those entries' keys and values for absorption."""
    n, Hkv, Lk = mass.shape
    C, B = pos_new.shape[1], pos_cache.shape[2]
    Lb, W = Lk - C, min(Lk, B)
    dev = mass.device
    j = torch.arange(Lk, device=dev)[None, :]  # [1, Lk]
    lnc = ln[:, None]
    valid = (j < lnc) | (j >= Lb)  # [n, Lk]
    mi = torch.where(j < Lb, j, lnc + j - Lb)  # merged index (position order)
    total = (ln + C)[:, None]
    protected = mi >= total - spec.recent
    scat = torch.cat([score_cache[slot_ids, :, :Lb], torch.zeros(n, Hkv, C, device=dev)], dim=2) + mass
    if spec.mode == "h2o":
        prio = scat.clone()
    else:
        prio = mi.to(torch.float32)[:, None, :].expand(n, Hkv, Lk).clone()
        if spec.mode == "lambda":
            protected = protected | (mi < spec.sink)
    prio.masked_fill_(protected[:, None, :], float("inf"))
    if spec.mode == "lambda":  # pinned (recalled) entries: kept like the sinks
        prio.masked_fill_(scat >= PIN_SCORE, float("inf"))
    prio.masked_fill_(~valid[:, None, :], float("-inf"))
    keep, vic = split_kept(prio, valid, W)
    new_len = (ln + C).clamp(max=B)
    filled = torch.arange(W, device=dev)[None, None, :] < new_len[:, None, None]
    if psi is not None and H is not None and z is not None and Lk > W:
        used = valid[:, None, :].expand(n, Hkv, Lk).gather(2, vic)
        vk_rows, vv_rows = victims(vic)
        f = psi_ref(vk_rows, psi) * used[..., None]
        H[slot_ids] = H[slot_ids] + torch.matmul(f.transpose(-1, -2), vv_rows.float())
        z[slot_ids] = z[slot_ids] + f.sum(dim=2)
    pcat = torch.cat([pos_cache[slot_ids, :, :Lb], pos_new.to(pos_cache.dtype)[:, None, :].expand(n, Hkv, C)], dim=2)
    kept = [(cache, take_rows(cat, keep)) for cache, cat in rows]
    kept += [(pos_cache, pcat.gather(2, keep).masked_fill(~filled, -1)),
             (score_cache, scat.gather(2, keep).masked_fill(~filled, 0.0))]
    for cache, new in kept:
        if W == B:  # whole slots rewritten: one index_copy per field
            cache.index_copy_(0, slot_ids, new.to(cache.dtype))
        else:
            cache[slot_ids, :, :W] = new
    return new_len.to(torch.int32)


def _order_key(prio: torch.Tensor) -> torch.Tensor:
    """prio [n, Hkv, Lk] fp32 -> int64 keys in the same order, all distinct: among equal priorities
    the lower index ranks higher (a stable descending sort's order), so a top-k over the keys picks
    exactly what the stable sort would."""
    b = (prio + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 ties with 0.0, as in a sort
    ordered = torch.where(b < 0, -(b & 0x7FFFFFFF) - 1, b)  # monotone in the float's value, -inf / inf included
    Lk = prio.shape[-1]
    return ordered * (1 << 20) + (Lk - 1 - torch.arange(Lk, device=prio.device))


def split_kept(prio: torch.Tensor, valid: torch.Tensor, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prio [n, Hkv, Lk] (protected inf, invalid -inf), valid [n, Lk] -> (keep [n, Hkv, W]: the W highest
    priorities in merged order, the invalid picks of slots not yet full last; victims [n, Hkv, Lk - W]:
    the rest). The victims are few (the chunk's length once a slot is full): one top-k over them and a
    prefix count place the kept entries, instead of a sort of every entry."""
    n, Hkv, Lk = prio.shape
    vic = _order_key(prio).topk(Lk - W, dim=-1, largest=False, sorted=False).indices  # [n, Hkv, V]
    kept = torch.ones(n, Hkv, Lk, dtype=torch.bool, device=prio.device).scatter_(2, vic, False)
    ok = valid[:, None, :]
    kept_valid, kept_invalid = kept & ok, kept & ~ok
    rank = torch.where(kept_valid, kept_valid.cumsum(-1),
                       kept_valid.sum(-1, keepdim=True) + kept_invalid.cumsum(-1)) - 1
    rank = torch.where(kept, rank, W)  # victims go to a spare column W, dropped
    src = torch.arange(Lk, device=prio.device).expand(n, Hkv, Lk)
    keep = torch.zeros(n, Hkv, W + 1, dtype=torch.long, device=prio.device).scatter_(2, rank, src)
    return keep[..., :W], vic


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [n, H, L, D], idx [n, H, W] -> x's rows idx along L: [n, H, W, D] (one index_select of
    whole D-rows, much faster on CPU than gather with an index expanded over D)."""
    n, H, L, D = x.shape
    base = (torch.arange(n * H, device=x.device) * L).view(n, H, 1)
    return x.reshape(n * H * L, D).index_select(0, (idx + base).reshape(-1)).view(n, H, idx.shape[-1], D)


def append(
    k_cache: torch.Tensor, v_cache: torch.Tensor, pos_cache: torch.Tensor, score_cache: torch.Tensor,
    slot_ids: torch.Tensor, ln: torch.Tensor,  # [n] long
    k_new: torch.Tensor, v_new: torch.Tensor,  # [n, Hkv, C, D]
    pos_new: torch.Tensor,  # [n, C]
    mass: torch.Tensor | None,  # [n, Hkv, Lb + C] or None (scores not accumulated: the full policy)
) -> torch.Tensor:
    """Every slot has room: add this step's mass to the cached scores, write the chunk at [len, len + C)."""
    return append_rows(((k_cache, k_new), (v_cache, v_new)), pos_cache, score_cache, slot_ids, ln, pos_new, mass)


def append_rows(
    rows: tuple[tuple[torch.Tensor, torch.Tensor], ...],  # (cache [S, Hkv, B, ...], chunk [n, Hkv, C, ...])
    pos_cache: torch.Tensor, score_cache: torch.Tensor, slot_ids: torch.Tensor, ln: torch.Tensor,
    pos_new: torch.Tensor, mass: torch.Tensor | None,
) -> torch.Tensor:
    """append over any per-entry fields written together."""
    n, Hkv, C = rows[0][1].shape[:3]
    at = slot_ids[:, None].expand(n, C)
    cols = ln[:, None] + torch.arange(C, device=ln.device)[None, :]  # [n, C]
    for cache, new in rows:
        cache[at, :, cols] = new.to(cache.dtype).movedim(2, 1)  # [n, C, Hkv, ...]
    pos_cache[at, :, cols] = pos_new.to(pos_cache.dtype)[..., None].expand(n, C, Hkv)
    if mass is not None:
        Lb = mass.shape[2] - C
        if Lb:
            score_cache[slot_ids, :, :Lb] = score_cache[slot_ids, :, :Lb] + mass[..., :Lb]
        score_cache[at, :, cols] = mass[..., Lb:].permute(0, 2, 1)
    return (ln + C).to(torch.int32)


def attend_evict_fast(
    q: torch.Tensor,  # [n, Hq, C, D] post-RoPE
    k_new: torch.Tensor,  # [n, Hkv, C, D]
    v_new: torch.Tensor,
    k_cache: torch.Tensor,  # [S, Hkv, B, D]  one layer of the slab
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    score_cache: torch.Tensor,
    length: torch.Tensor,  # [S], read only
    slot_ids: torch.Tensor,  # [n] long
    pos_new: torch.Tensor,  # [n, C]
    scale: float,
    spec: EvictionSpec,
    H: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    phi_q: torch.Tensor | None = None,  # [n, Hq, C, R]
    psi: LessLayerWeights | None = None,
    max_len: int | None = None,
    host: tuple[list[int], list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of the compressed step: attention (cache + causal chunk + LESS), then evict-and-absorb.
    Returns out [n, Hq, C, D] and the new lengths [n] int32.

    `max_len`: an upper bound on the slots' lengths (None: the capacity). `host`: the slots and their
    exact lengths, known on the host; with the full policy the step then attends with SDPA over
    views of each slot's rows (no gather, no scores: the full policy never reads them)."""
    C, B = q.shape[2], k_cache.shape[2]
    if spec.mode == "full" and host is not None:
        ln = length[slot_ids].long()
        new_len = append(k_cache, v_cache, pos_cache, score_cache, slot_ids, ln, k_new, v_new, pos_new, None)
        return full_attention_views(q, k_cache, v_cache, *host), new_len
    out, mass, cat = attend_slots(q, k_new, v_new, k_cache, v_cache, length, slot_ids, scale, H, z, phi_q, max_len)
    if spec.mode == "full" or cat.Lb + C <= B:  # room for the chunk in every slot
        return out, append(k_cache, v_cache, pos_cache, score_cache, slot_ids, cat.ln, k_new, v_new, pos_new, mass)
    return out, evict_cat(k_cache, v_cache, pos_cache, score_cache, slot_ids, cat.ln, cat.k, cat.v, pos_new, mass,
                          spec, H, z, psi)


def evict_absorb_fast(
    k_cache: torch.Tensor, v_cache: torch.Tensor, pos_cache: torch.Tensor, score_cache: torch.Tensor,
    length: torch.Tensor, slot_ids: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos_new: torch.Tensor,
    mass_cache: torch.Tensor,  # [n, Hkv, B]
    mass_new: torch.Tensor,  # [n, Hkv, C]
    spec: EvictionSpec, H: torch.Tensor | None = None, z: torch.Tensor | None = None,
    psi: LessLayerWeights | None = None, max_len: int | None = None,
) -> torch.Tensor:
    """`evict_absorb_ref`'s contract (returns the new lengths [n] int32); `max_len` as in attend_evict_fast."""
    C, B = k_new.shape[2], k_cache.shape[2]
    kcat, vcat = gather_cat(k_cache, slot_ids, k_new, max_len), gather_cat(v_cache, slot_ids, v_new, max_len)
    Lb = kcat.shape[2] - C
    ln, valid = valid_rows(length, slot_ids, Lb)
    # the reference never reads mass past a slot's length: rows there must stay empty (score 0)
    mass = torch.cat([mass_cache[..., :Lb].float() * valid[:, None, :], mass_new.float()], dim=2)
    if spec.mode == "full" or Lb + C <= B:
        return append(k_cache, v_cache, pos_cache, score_cache, slot_ids, ln, k_new, v_new, pos_new, mass)
    return evict_cat(k_cache, v_cache, pos_cache, score_cache, slot_ids, ln, kcat, vcat, pos_new, mass, spec, H, z, psi)
