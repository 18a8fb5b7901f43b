"""Recall (torch reference): score a session's history pages with the new message's queries and
bring the best back into its slot, one layer at a time, keeping the LESS state exact.

History (workers/history.py): every token the session consumed, post-RoPE K/V per layer and KV
head, in pages of P tokens aligned to absolute positions (page i holds positions [iP, (i+1)P));
`base` is the first position still held (older pages were dropped under host pressure).

Page summary: the per-channel min and max of its keys (Quest). For a query q and a page,
  bound(q, page) = sum_d max(q_d kmin_d, q_d kmax_d) = q+ . kmax + q- . kmin  >=  q . k
for every key k of the page, so the pages whose bound is highest for some query of the group are
the ones that may hold its largest logits. A page scores the max bound over the queries of its
KV head's group (every query head that shares the KV head, every query token used).

One round, per KV head, on a full slot (a slot below budget has evicted nothing):
  1. unpin the entries the previous round pinned;
  2. pick the `pages` best-bound pages that are not wholly resident;
  3. their resident tokens stay where they are, pinned; the others come back, replacing the slot
     entries least relevant to the queries (max logit over the group), never the protected ones
     (lambda's sinks, the recent window);
  4. LESS: H, z lose every recalled token's psi(k)^T v, psi(k) and gain every replaced entry's,
     so the state stays the sum over the tokens not in the slot;
  5. recalled and pinned entries get score PIN_SCORE (eviction keeps them until the next round),
     and the head's entries are re-sorted by position, the order eviction relies on.
"""

from __future__ import annotations

import torch

from lessserve.kernels.reference.evict import PIN_SCORE
from lessserve.kernels.reference.lowrank import LessLayerWeights, psi_ref


def page_summaries(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k [Hkv, T, D] (T a multiple of page) -> (kmin, kmax) [Hkv, T // page, D] fp32."""
    Hkv, T, D = k.shape
    p = k.float().view(Hkv, T // page, page, D)
    return p.amin(2), p.amax(2)


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """q [Hkv, M, D] (a group's queries), kmin / kmax [Hkv, Np, D] -> [Hkv, Np]: the max over the
    M queries of the Quest bound, an upper bound on q . k over the page's keys."""
    q = q.float()
    bound = q.clamp(min=0) @ kmax.transpose(1, 2) + q.clamp(max=0) @ kmin.transpose(1, 2)  # [Hkv, M, Np]
    return bound.amax(1)


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q [Hq, C, D] -> [Hkv, G * C, D]: the queries of the heads sharing each KV head."""
    Hq, C, D = q.shape
    return q.reshape(num_kv_heads, (Hq // num_kv_heads) * C, D)


def _absorb(H: torch.Tensor, z: torch.Tensor, k: torch.Tensor, v: torch.Tensor, used: torch.Tensor,
            psi: LessLayerWeights, sign: float) -> None:
    """H [Hkv, R, D] += sign * sum_t psi(k_t)^T v_t, z [Hkv, R] += sign * sum_t psi(k_t), over the
    rows with used [Hkv, m]; k / v [Hkv, m, D]."""
    f = psi_ref(k[None], psi)[0] * used[..., None]  # [Hkv, m, R]
    H.add_(sign * torch.einsum("htr,htd->hrd", f, v.float()))
    z.add_(sign * f.sum(1))


@torch.no_grad()
def recall_layer_ref(
    k_slot: torch.Tensor,  # [Hkv, B, D] one slot's layer, written in place
    v_slot: torch.Tensor,  # [Hkv, B, D]
    pos_slot: torch.Tensor,  # [Hkv, B] int32, ascending within [0, length)
    score_slot: torch.Tensor,  # [Hkv, B] fp32
    length: int,
    q: torch.Tensor,  # [Hkv, M, D] the group queries that score (post-RoPE)
    hist_k: torch.Tensor,  # [Hkv, T, D] positions base .. base + T - 1
    hist_v: torch.Tensor,  # [Hkv, T, D]
    base: int,  # a multiple of page
    page: int,
    pages: int,  # pages recalled per KV head
    recent: int,  # the last `recent` entries are never replaced
    sink: int,  # nor the first `sink` (lambda)
    scale: float,
    H: torch.Tensor | None = None,  # [Hkv, R, D] fp32, written in place
    z: torch.Tensor | None = None,  # [Hkv, R] fp32
    psi: LessLayerWeights | None = None,
    summaries: tuple[torch.Tensor, torch.Tensor] | None = None,  # page_summaries of hist_k's full pages
) -> torch.Tensor:
    """One recall round on one layer of one slot. Returns the tokens brought back per KV head [Hkv]."""
    Hkv, B, D = k_slot.shape
    dev = k_slot.device
    brought = torch.zeros(Hkv, dtype=torch.long)
    score_slot.masked_fill_(score_slot >= PIN_SCORE, 0.0)  # 1. the previous round's pins end
    T = hist_k.shape[1]
    n_pages = T // page
    if length < B or n_pages == 0 or pages == 0:
        return brought
    kmin, kmax = summaries if summaries is not None else page_summaries(hist_k[:, : n_pages * page], page)
    bound = page_scores(q, kmin.to(dev), kmax.to(dev))  # [Hkv, Np]
    rel = (q.float() @ k_slot.float().transpose(1, 2)).amax(1) * scale  # [Hkv, B] relevance of each entry
    j = torch.arange(B, device=dev)
    victims_k, victims_v, back_k, back_v, n_back = [], [], [], [], []
    for h in range(Hkv):
        pos = pos_slot[h].long()  # [B]
        held = pos - base
        res = torch.zeros(n_pages * page, dtype=torch.bool, device=dev)  # history index -> in the slot
        res[held[(held >= 0) & (held < n_pages * page)]] = True
        per_page = res.view(n_pages, page)
        s = bound[h].masked_fill(per_page.all(1), float("-inf"))  # 2. wholly resident pages are not candidates
        top = s.topk(min(pages, n_pages)).indices
        top = top[s[top] > float("-inf")]
        want = (top[:, None] * page + torch.arange(page, device=dev)[None]).flatten()  # [pages * P] history index
        back = want[~res[want]]  # tokens to bring back, best page first
        pinned = torch.isin(held, want)  # 3. resident tokens of the chosen pages stay, pinned
        protected = (j >= length - recent) | (j < sink) | pinned
        free = (~protected).nonzero().flatten()
        back = back[: len(free)]
        out = free[rel[h, free].argsort()[: len(back)]]  # the least relevant entries make room
        victims_k.append(k_slot[h, out].clone())
        victims_v.append(v_slot[h, out].clone())
        back_k.append(hist_k[h, back].to(dev, k_slot.dtype))
        back_v.append(hist_v[h, back].to(dev, v_slot.dtype))
        n_back.append(len(back))
        k_slot[h, out] = back_k[-1]
        v_slot[h, out] = back_v[-1]
        pos_slot[h, out] = (back + base).to(pos_slot.dtype)
        score_slot[h, out] = PIN_SCORE
        score_slot[h, pinned] = PIN_SCORE
        order = pos_slot[h, :length].argsort()  # 5. position order, as eviction expects
        for t in (k_slot, v_slot, pos_slot, score_slot):
            t[h, :length] = t[h, :length][order]
        brought[h] = len(back)
    if psi is not None and H is not None and z is not None and max(n_back):  # 4. the LESS state stays exact
        m = max(n_back)
        used = torch.arange(m, device=dev)[None, :] < torch.tensor(n_back, device=dev)[:, None]  # [Hkv, m]

        def pad(rows: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([torch.cat([r, r.new_zeros(m - len(r), D)]) for r in rows])  # [Hkv, m, D]

        _absorb(H, z, pad(victims_k), pad(victims_v), used, psi, +1.0)
        _absorb(H, z, pad(back_k), pad(back_v), used, psi, -1.0)
    return brought
