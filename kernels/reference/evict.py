"""Evict-and-absorb (torch reference): merge a chunk into its slots, keep `budget` entries per
(slot, KV head) under the policy, fold every victim into the LESS state, compact in place.

Merged order is the cache's valid entries followed by the chunk's new entries, i.e. ascending
absolute position, and compaction preserves it, so "recent" = the last entries.
  h2o:    keep the last `recent` entries + the highest accumulated scores among the rest.
  lambda: keep the first `sink` entries + the last `budget - sink`.
  full:   keep everything (the caller guarantees it fits).
Entries whose score is at least PIN_SCORE (pages a `+recall` turn brought back) are kept by every
policy until the next recall round unpins them: h2o keeps them as its highest scores, lambda
protects them like its sinks. The policy's spec leaves room for them (compression.eviction_spec).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from lessserve.kernels.reference.lowrank import LessLayerWeights, psi_ref

PIN_SCORE = 1e30  # score of a pinned (recalled) entry; accumulated attention mass stays far below it


@dataclass(frozen=True)
class EvictionSpec:
    mode: Literal["full", "h2o", "lambda"]
    budget: int
    recent: int
    sink: int = 0


def keep_priority(
    score: torch.Tensor,  # [n, Hkv, T] fp32 accumulated scores in merged order
    total: torch.Tensor,  # [n] valid merged entries per slot
    spec: EvictionSpec,
) -> torch.Tensor:
    """Priority per merged entry; the `budget` highest are kept. Invalid entries get -inf."""
    T = score.shape[-1]
    j = torch.arange(T, device=score.device)[None, None, :]
    tot = total[:, None, None]
    protected = j >= tot - spec.recent
    if spec.mode == "h2o":
        prio = score.clone()
    else:  # lambda, full: plain recency
        prio = j.expand_as(score).to(score.dtype).clone()
        protected = protected | (j < spec.sink) | (score >= PIN_SCORE) if spec.mode == "lambda" else protected
    prio = prio.masked_fill(protected, float("inf"))
    return prio.masked_fill(j >= tot, float("-inf"))


def evict_absorb_ref(
    k_cache: torch.Tensor,  # [S, Hkv, B, D]  one layer of the slab, written in place
    v_cache: torch.Tensor,  # [S, Hkv, B, D]
    pos_cache: torch.Tensor,  # [S, Hkv, B] int32 (-1 = empty)
    score_cache: torch.Tensor,  # [S, Hkv, B] fp32
    length: torch.Tensor,  # [S] int, read only
    slot_ids: torch.Tensor,  # [n] long
    k_new: torch.Tensor,  # [n, Hkv, C, D]
    v_new: torch.Tensor,  # [n, Hkv, C, D]
    pos_new: torch.Tensor,  # [n, C] int
    mass_cache: torch.Tensor,  # [n, Hkv, B] attention mass this step brought to cached entries
    mass_new: torch.Tensor,  # [n, Hkv, C]
    spec: EvictionSpec,
    H: torch.Tensor | None = None,  # [S, Hkv, R, D] fp32, written in place
    z: torch.Tensor | None = None,  # [S, Hkv, R] fp32, written in place
    psi: LessLayerWeights | None = None,
) -> torch.Tensor:
    """Returns the new length per slot [n] (int32)."""
    return evict_rows_ref(((k_cache, k_new), (v_cache, v_new)), pos_cache, score_cache, length, slot_ids, pos_new,
                          mass_cache, mass_new, spec, H, z, psi)


def evict_rows_ref(
    rows: tuple[tuple[torch.Tensor, torch.Tensor], ...],  # (cache [S, Hkv, B, ...], chunk [n, Hkv, C, ...])
    pos_cache: torch.Tensor,  # [S, Hkv, B] int32 (-1 = empty)
    score_cache: torch.Tensor,  # [S, Hkv, B] fp32
    length: torch.Tensor,  # [S] int, read only
    slot_ids: torch.Tensor,  # [n] long
    pos_new: torch.Tensor,  # [n, C] int
    mass_cache: torch.Tensor,  # [n, Hkv, B]
    mass_new: torch.Tensor,  # [n, Hkv, C]
    spec: EvictionSpec,
    H: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    psi: LessLayerWeights | None = None,
    kv_of: Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]] = lambda m: (m[0], m[1]),
) -> torch.Tensor:
    """evict_absorb_ref over any per-entry fields moved together: native k and v, or a quantised
    slot's codes and scales. `kv_of(merged fields)` gives the merged keys and values
    [n, Hkv, B + C, D] the victims are absorbed with (what the slot holds)."""
    n, Hkv, C = rows[0][1].shape[:3]
    B = pos_cache.shape[2]
    dev = rows[0][1].device
    ln = length[slot_ids].to(dev).long()  # [n]
    total = ln + C
    if bool((total <= B).all()):  # nothing to evict: append in place (same result as the general path)
        return _append(rows, pos_cache, score_cache, slot_ids, ln, pos_new, mass_cache, mass_new)
    # Gather the merged sequence in position order: cache[:len] then new[:C].
    j = torch.arange(B + C, device=dev)[None, :]
    src = torch.where(j < ln[:, None], j, B + j - ln[:, None]).clamp(max=B + C - 1)  # [n, B + C]
    idx = src[:, None, :].expand(n, Hkv, B + C)
    merged = [_along(torch.cat([cache[slot_ids], new.to(cache.dtype)], dim=2), idx) for cache, new in rows]
    merged_pos = torch.cat(
        [pos_cache[slot_ids], pos_new.to(pos_cache.dtype)[:, None, :].expand(n, Hkv, C)], dim=2
    ).gather(2, idx)
    merged_score = torch.cat([score_cache[slot_ids] + mass_cache.float(), mass_new.float()], dim=2).gather(2, idx)

    prio = keep_priority(merged_score, total, spec)  # [n, Hkv, B + C]
    keep = prio.topk(B, dim=-1).indices.sort(dim=-1).values  # [n, Hkv, B] ascending = position order
    new_len = total.clamp(max=B)
    filled = torch.arange(B, device=dev)[None, None, :] < new_len[:, None, None]  # [n, 1, B]

    if psi is not None and H is not None and z is not None:
        kept_mask = torch.zeros_like(merged_score, dtype=torch.bool).scatter(2, keep, filled.expand(n, Hkv, B))
        victim = (j[:, None, :] < total[:, None, None]) & ~kept_mask  # [n, Hkv, B + C]
        if bool(victim.any()):
            merged_k, merged_v = kv_of(merged)
            f = psi_ref(merged_k, psi) * victim[..., None]  # [n, Hkv, B + C, R]
            H[slot_ids] = H[slot_ids] + torch.einsum("nhtr,nhtd->nhrd", f, merged_v.float())
            z[slot_ids] = z[slot_ids] + f.sum(dim=2)

    for (cache, _), m in zip(rows, merged, strict=True):
        cache[slot_ids] = _along(m, keep)
    pos_cache[slot_ids] = merged_pos.gather(2, keep).masked_fill(~filled, -1)
    score_cache[slot_ids] = merged_score.gather(2, keep).masked_fill(~filled, 0.0)
    return new_len.to(torch.int32)


def _along(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [n, Hkv, T, ...] -> its entries idx [n, Hkv, W] along T: [n, Hkv, W, ...]."""
    extra = x.shape[3:]
    return x.gather(2, idx.view(*idx.shape, *(1,) * len(extra)).expand(*idx.shape, *extra))


def _append(rows, pos_cache, score_cache, slot_ids, ln, pos_new, mass_cache, mass_new):
    """Every slot has room: accumulate this step's mass, write the chunk at [len, len + C)."""
    n, Hkv, C = rows[0][1].shape[:3]
    dev = rows[0][1].device
    score_cache[slot_ids] = score_cache[slot_ids] + mass_cache.float()
    at = slot_ids[:, None].expand(n, C)  # [n, C]
    cols = ln[:, None] + torch.arange(C, device=dev)[None, :]  # [n, C]
    for cache, new in rows:
        cache[at, :, cols] = new.to(cache.dtype).movedim(2, 1)  # [n, C, Hkv, ...]
    pos_cache[at, :, cols] = pos_new.to(pos_cache.dtype)[..., None].expand(n, C, Hkv)
    score_cache[at, :, cols] = mass_new.float().permute(0, 2, 1)
    tail = (torch.arange(pos_cache.shape[2], device=dev)[None, :] >= (ln + C)[:, None])[:, None, :]  # [n, 1, B]
    pos_cache[slot_ids] = pos_cache[slot_ids].masked_fill(tail, -1)
    score_cache[slot_ids] = score_cache[slot_ids].masked_fill(tail, 0.0)
    return (ln + C).to(torch.int32)
