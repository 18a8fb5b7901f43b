"""Recall (torch reference): choose a session's history pages with the new message's queries and
bring them back into its slot, one layer at a time, keeping the LESS state exact.

History (workers/history.py): every token the session consumed, post-RoPE K/V per layer and KV
head, in pages of P tokens aligned to absolute positions (page i holds positions [iP, (i+1)P));
`base` is the first position still held (older pages were dropped under host pressure).

Choosing (chosen on the dev split, docs/recall.md): the new message's last queries (at every layer,
those of the session's last `recall_queries` tokens, the prompt's last one included) attend over
the history; a page's score is, summed over layers and KV heads, the largest attention mass any
query of the head's group puts on it (`history_page_mass`, summed in the engine). One set of pages
serves every layer and head: a fact the answer copies is needed by every layer that reads it.
(What else was tried on dev, and lost: docs/recall.md.)

One round on one layer of a full slot (a slot below budget has evicted nothing), per KV head:
  1. unpin the entries the previous round pinned;
  2. the chosen pages' tokens already in the slot stay, pinned; the others come back, replacing
     the entries least relevant to the queries (max logit over the group), never protected ones
     (lambda's sinks, the recent window);
  3. LESS: H, z lose every recalled token's psi(k)^T v, psi(k) and gain every replaced entry's, so
     the state stays the sum over the tokens not in the slot;
  4. recalled and pinned entries get score PIN_SCORE (eviction keeps them until the next round),
     and the head's entries are re-sorted by position, the order eviction relies on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lessserve.kernels.reference.evict import PIN_SCORE
from lessserve.kernels.reference.lowrank import LessLayerWeights, psi_ref


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q [..., Hq, C, D] -> [..., Hkv, G * C, D]: the queries of the heads sharing each KV head."""
    return q.unflatten(-3, (num_kv_heads, -1)).flatten(-3, -2)


def history_page_mass(q: torch.Tensor, k: torch.Tensor | Sequence[torch.Tensor], scale: float,
                      page: int) -> torch.Tensor:
    """q [..., Hkv, M, D] (a layer's group queries, or every layer's), k [..., Hkv, T, D] (history keys,
    T a multiple of page), or the same keys as consecutive blocks [..., Hkv, T_i, D] (each T_i a
    multiple of page) -> [..., Hkv, T // page]: per KV head, the max over the M queries of the
    softmax mass (over the history) on each page."""
    blocks = [k] if isinstance(k, torch.Tensor) else list(k)
    qf = q.float()
    logits = torch.cat([qf @ b.float().transpose(-1, -2) for b in blocks], dim=-1) * scale  # [..., Hkv, M, T]
    p = logits.softmax(-1)
    return p.unflatten(-1, (-1, page)).sum(-1).amax(-2)


def page_tokens(chosen: torch.Tensor, page: int, held: int) -> torch.Tensor:
    """chosen [k] page indices (best first) -> the history indices of their tokens [<= k * page], < held."""
    want = (chosen.long()[:, None] * page + torch.arange(page)[None]).flatten()
    return want[want < held]


def redundant_pages(ids: torch.Tensor, page: int, pages: int, recent: int, n: int = 3) -> torch.Tensor:
    """ids [T] the history's token ids (-1 unknown) -> [pages] bool: pages every n-gram within which also
    occurs among the last `recent` tokens, which the slot holds anyway: bringing them back adds no
    information (in a chat, the template lines that recur every turn: "Assistant: Noted.\nUser:").
    Pages with an unknown id are never redundant."""
    def grams(x: list[int]) -> set[tuple[int, ...]]:
        return {tuple(x[i : i + n]) for i in range(len(x) - n + 1)}

    x = ids.tolist()
    held = set() if recent <= 0 else grams(x[-recent:])
    out = torch.zeros(pages, dtype=torch.bool)
    for p in range(pages):
        window = x[p * page : (p + 1) * page]
        out[p] = min(window) >= 0 and len(window) >= n and grams(window) <= held
    return out


def choose_pages(score: torch.Tensor, pages: int, skip: torch.Tensor,
                 glued: torch.Tensor | None = None) -> torch.Tensor:
    """score [Np], skip [Np] bool (pages eviction keeps anyway) -> the best `pages` page indices.
    glued [Np] bool: page i and page i + 1 split a word (a number, a name) between them; a chosen
    page then brings its glued neighbours along (in the place of lower-scored pages), so the word
    comes back whole."""
    s = score.masked_fill(skip, float("-inf"))
    order = s.argsort(descending=True, stable=True)
    order = order[s[order] > float("-inf")]
    if glued is None:
        return order[:pages]
    out: list[int] = []
    for p in order.tolist():
        run = [p]
        while run[0] > 0 and glued[run[0] - 1] and not skip[run[0] - 1]:  # the word goes on to the left
            run.insert(0, run[0] - 1)
        while run[-1] + 1 < len(s) and glued[run[-1]] and not skip[run[-1] + 1]:  # and to the right
            run.append(run[-1] + 1)
        out += [q for q in run if q not in out][: pages - len(out)]
        if len(out) >= pages:
            break
    return torch.tensor(out, dtype=torch.long)


def glued_pages(ids: torch.Tensor, page: int, pages: int, starts_inside: torch.Tensor,
                ends_inside: torch.Tensor) -> torch.Tensor:
    """ids [T] token ids (-1 unknown) -> [pages] bool: page i's last token and page i + 1's first one
    belong to one word (the first ends with a letter or digit, the next starts with one, no space);
    starts_inside / ends_inside [V] bool per vocabulary id."""
    out = torch.zeros(pages, dtype=torch.bool)
    if pages < 2:
        return out
    last, first = ids[page - 1 : (pages - 1) * page : page], ids[page : pages * page : page]  # [pages - 1]
    known = (last >= 0) & (first >= 0)
    out[: pages - 1] = known & ends_inside[last.clamp(min=0)] & starts_inside[first.clamp(min=0)]
    return out


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
    q: torch.Tensor,  # [Hkv, M, D] the group queries that rank the slot's entries (post-RoPE)
    want: torch.Tensor,  # [m] history indices (position - base) of the chosen pages' tokens, best page first
    want_k: torch.Tensor,  # [Hkv, m, D] their keys in the history
    want_v: torch.Tensor,  # [Hkv, m, D]
    base: int,  # the history's first position
    recent: int,  # the last `recent` entries are never replaced
    sink: int,  # nor the first `sink` (lambda)
    scale: float,
    H: torch.Tensor | None = None,  # [Hkv, R, D] fp32, written in place
    z: torch.Tensor | None = None,  # [Hkv, R] fp32
    psi: LessLayerWeights | None = None,
) -> torch.Tensor:
    """One recall round on one layer of one slot. Returns the tokens brought back per KV head [Hkv]."""
    Hkv, B, D = k_slot.shape
    dev = k_slot.device
    brought = torch.zeros(Hkv, dtype=torch.long)
    score_slot.masked_fill_(score_slot >= PIN_SCORE, 0.0)  # 1. the previous round's pins end
    if length < B or len(want) == 0:
        return brought
    want = want.to(dev)
    j = torch.arange(B, device=dev)
    protected_j = (j >= length - recent) | (j < sink)  # [B] entries eviction keeps anyway
    rel = (q.float() @ k_slot.float().transpose(1, 2)).amax(1)  # [Hkv, B] relevance of each entry
    victims_k, victims_v, back_k, back_v, n_back = [], [], [], [], []
    for h in range(Hkv):
        held = pos_slot[h].long() - base  # [B] history index of each entry
        pinned = torch.isin(held, want)  # 2. chosen tokens already here stay, pinned
        free = (~(protected_j | pinned)).nonzero().flatten()
        rows = (~torch.isin(want, held)).nonzero().flatten()[: len(free)]  # the others come back, best page first
        back = want[rows]
        out = free[rel[h, free].argsort()[: len(back)]]  # the least relevant entries make room
        victims_k.append(k_slot[h, out].clone())
        victims_v.append(v_slot[h, out].clone())
        back_k.append(want_k[h, rows.cpu()].to(dev, k_slot.dtype))
        back_v.append(want_v[h, rows.cpu()].to(dev, v_slot.dtype))
        n_back.append(len(back))
        k_slot[h, out] = back_k[-1]
        v_slot[h, out] = back_v[-1]
        pos_slot[h, out] = (back + base).to(pos_slot.dtype)
        score_slot[h, out] = PIN_SCORE
        score_slot[h, pinned] = PIN_SCORE
        order = pos_slot[h, :length].argsort()  # 4. position order, as eviction expects
        for t in (k_slot, v_slot, pos_slot, score_slot):
            t[h, :length] = t[h, :length][order]
        brought[h] = len(back)
    if psi is not None and H is not None and z is not None and max(n_back):  # 3. the LESS state stays exact
        m = max(n_back)
        used = torch.arange(m, device=dev)[None, :] < torch.tensor(n_back, device=dev)[:, None]  # [Hkv, m]

        def pad(rows: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([torch.cat([r, r.new_zeros(m - len(r), D)]) for r in rows])  # [Hkv, m, D]

        _absorb(H, z, pad(victims_k), pad(victims_v), used, psi, +1.0)
        _absorb(H, z, pad(back_k), pad(back_v), used, psi, -1.0)
    return brought
