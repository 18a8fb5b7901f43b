"""Recall (torch reference): choose a session's history pages with the new message's queries and
bring them back into its slot, one layer at a time, keeping the LESS state exact.

History (workers/history.py): every token the session consumed, post-RoPE K/V per layer and KV
head, in pages of P tokens aligned to absolute positions (page i holds positions [iP, (i+1)P));
`base` is the first position still held (older pages were dropped under host pressure).

Choosing (chosen on the dev split, docs/recall.md): the new message's last queries (at every layer,
those of the session's last `recall_queries` tokens, the prompt's last one included) attend over
the history; per layer and KV head, a page gets the largest attention mass any query of the head's
group puts on it (`history_page_mass`), and its score sums that over the few layer-heads that put
the most on it (`recall_heads`, `top_heads_score`). One set of pages serves every layer and head: a
fact the answer copies is needed by every layer that reads it.
(What else was tried on dev, and lost: docs/recall.md.)

One round on one layer of a full slot (a slot below budget has evicted nothing), per KV head:
  1. unpin the entries the previous round pinned;
  2. the chosen pages' tokens already in the slot stay, pinned; the others come back, replacing
     the entries least relevant to the queries (max logit over the group), never protected ones
     (lambda's sinks, the recent window);
  3. LESS: H, z lose every recalled token's psi(k)^T v, psi(k) and gain every replaced entry's, so
     the state stays the sum over the tokens not in the slot;
  4. recalled and pinned entries get score PIN_SCORE (eviction keeps them through the reply), and
     the head's entries are re-sorted by position, the order eviction relies on.

The round lends its pages to one turn (`Lent`): when the turn's reply ends, `return_layer_ref` puts
the entries they replaced back (K/V, position, eviction score) and gives the pinned entries their
scores again, and `unread_layer_ref` gives the re-read tokens the K/V their step computed, so the
next turn is read over the slot its policy kept, not over the last question's pages (chosen on the
dev split: pages that stay pinned hold h2o's whole heavy half, docs/recall.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lessserve.kernels.reference.evict import PIN_SCORE
from lessserve.kernels.reference.lowrank import LessLayerWeights, psi_ref


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q [..., Hq, C, D] -> [..., Hkv, G * C, D]: the queries of the heads sharing each KV head."""
    return q.unflatten(-3, (num_kv_heads, -1)).flatten(-3, -2)


def history_page_mass(q: torch.Tensor, k: torch.Tensor | Sequence[torch.Tensor], scale: float,
                      page: int, lead: int = 0) -> torch.Tensor:
    """q [..., Hkv, M, D] (a layer's group queries, or every layer's), k [..., Hkv, T, D] (history keys,
    T a multiple of page), or the same keys as consecutive blocks [..., Hkv, T_i, D] (each T_i a
    multiple of page) -> [..., Hkv, T // page]: per KV head, the max over the M queries of the
    softmax mass (over the history) on each page, and on the `lead` tokens before it: a query that
    matches a fact's cue ("The access code is") needs what follows the cue, which a page boundary can
    put on the next page (dev: docs/recall.md)."""
    blocks = [k] if isinstance(k, torch.Tensor) else list(k)
    qf = q.float()
    logits = torch.cat([qf @ b.float().transpose(-1, -2) for b in blocks], dim=-1) * scale  # [..., Hkv, M, T]
    p = logits.softmax(-1)
    if lead <= 0:
        return p.unflatten(-1, (-1, page)).sum(-1).amax(-2)
    c = torch.nn.functional.pad(p.cumsum(-1), (1, 0))  # [..., M, T + 1]: c[t] = mass on tokens before t
    ends = torch.arange(page, p.shape[-1] + 1, page, device=p.device)  # [pages] each page's end
    starts = (ends - page - lead).clamp(min=0)  # its first token, or `lead` tokens before it
    mass = c[..., ends] - c[..., starts]  # [..., Hkv, M, pages]
    return mass.amax(-2)


def top_heads_score(mass: torch.Tensor, heads: int) -> torch.Tensor:
    """mass [N, pages] (per layer and KV head, `history_page_mass`) -> [pages]: each page's mass summed
    over the `heads` layer-heads that put the most on it (0 or >= N: over all of them). A fact is
    found by a few retrieval heads; summed over every head, the many that spread their mass over
    filler (newlines, punctuation) outvote them (dev: docs/recall.md)."""
    if heads <= 0 or heads >= mass.shape[0]:
        return mass.sum(0)
    return mass.topk(heads, dim=0).values.sum(0)


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


@dataclass
class Lent:
    """What one recall round changed in one layer of one slot, per KV head h, for the turn's end to
    give back: the positions it brought back [m_h]; the entries they replaced (positions [m_h], K/V
    [m_h, D] on the host, eviction scores [m_h]); the entries it pinned (positions, their scores)."""
    back: list[torch.Tensor] = field(default_factory=list)
    out_pos: list[torch.Tensor] = field(default_factory=list)
    out_k: list[torch.Tensor] = field(default_factory=list)
    out_v: list[torch.Tensor] = field(default_factory=list)
    out_score: list[torch.Tensor] = field(default_factory=list)
    pinned_pos: list[torch.Tensor] = field(default_factory=list)
    pinned_score: list[torch.Tensor] = field(default_factory=list)
    # the re-read tokens (positions read_at ..): their K/V [Hkv, k, D] as the step wrote them, and as the
    # re-read wrote them over (None at layers the re-read did not run)
    read_at: int = -1
    read_k: torch.Tensor | None = None
    read_v: torch.Tensor | None = None
    new_k: torch.Tensor | None = None
    new_v: torch.Tensor | None = None


def _absorb(H: torch.Tensor, z: torch.Tensor, k: torch.Tensor, v: torch.Tensor, used: torch.Tensor,
            psi: LessLayerWeights, sign: float) -> None:
    """H [Hkv, R, D] += sign * sum_t psi(k_t)^T v_t, z [Hkv, R] += sign * sum_t psi(k_t), over the
    rows with used [Hkv, m]; k / v [Hkv, m, D]."""
    f = psi_ref(k[None], psi)[0] * used[..., None]  # [Hkv, m, R]
    H.add_(sign * torch.einsum("htr,htd->hrd", f, v.float()))
    z.add_(sign * f.sum(1))


def _swap_less(H: torch.Tensor | None, z: torch.Tensor | None, psi: LessLayerWeights | None,
               gone_k: list[torch.Tensor], gone_v: list[torch.Tensor], come_k: list[torch.Tensor],
               come_v: list[torch.Tensor]) -> None:
    """The LESS state after a swap, per KV head h: the entries that left the slot (gone_k / gone_v [m_h, D])
    are absorbed, the ones that came in (come_k / come_v, the same m_h) are taken out of the sum."""
    counts = [len(r) for r in gone_k]
    if psi is None or H is None or z is None or not max(counts, default=0):
        return
    m, D, dev = max(counts), H.shape[-1], H.device
    used = torch.arange(m, device=dev)[None, :] < torch.tensor(counts, device=dev)[:, None]  # [Hkv, m]

    def pad(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.cat([r.to(dev), r.new_zeros(m - len(r), D).to(dev)]) for r in rows])  # [Hkv, m, D]

    _absorb(H, z, pad(gone_k), pad(gone_v), used, psi, +1.0)
    _absorb(H, z, pad(come_k), pad(come_v), used, psi, -1.0)


def end_pins(score_slot: torch.Tensor) -> None:
    """Step 1 of a round: pinned entries (score PIN_SCORE) a turn's end did not return become plain
    entries again (score 0), in place; any shape."""
    score_slot.masked_fill_(score_slot >= PIN_SCORE, 0.0)


def _sort_heads(length: int, *slot: torch.Tensor) -> None:
    """Re-sort every head's first `length` entries of each slot tensor [Hkv, B, ...] by position (slot[2])."""
    order = slot[2][:, :length].argsort(1)  # [Hkv, length]
    for t in slot:
        idx = order if t.dim() == 2 else order[..., None].expand(-1, -1, t.shape[-1])
        t[:, :length] = t[:, :length].gather(1, idx)


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
    lent: Lent | None = None,  # filled with what the turn's end gives back
) -> torch.Tensor:
    """One recall round on one layer of one slot. Returns the tokens brought back per KV head [Hkv]."""
    n, swapped = _recall_heads(k_slot, v_slot, pos_slot, score_slot, length, q, want, want_k, want_v, base, recent,
                               sink, lent)
    _swap_less(H, z, psi, *swapped)  # 3. the LESS state stays exact
    return n


def _recall_heads(k_slot, v_slot, pos_slot, score_slot, length, q, want, want_k, want_v, base, recent, sink,
                  lent) -> tuple[torch.Tensor, tuple[list[torch.Tensor], ...]]:
    """Steps 1, 2 and 4 of a round over the heads of k_slot [heads, B, D] (`recall_layer_ref`'s arguments):
    the tokens brought back per head [heads], and per head the K/V that left and came in (for the
    LESS swap)."""
    Hkv, B, D = k_slot.shape
    dev = k_slot.device
    end_pins(score_slot)  # 1. pins a turn's end did not return end here
    if length < B or len(want) == 0:
        return torch.zeros(Hkv, dtype=torch.long), ([], [], [], [])
    want, m = want.to(dev), len(want)
    j = torch.arange(B, device=dev)
    protected = (j >= length - recent) | (j < sink)  # [B] entries eviction keeps anyway
    rel = (q.float() @ k_slot.float().transpose(1, 2)).amax(1)  # [Hkv, B] relevance of each entry
    match = (pos_slot.long() - base)[:, None, :] == want[None, :, None]  # [Hkv, m, B]
    pinned = match.any(1)  # [Hkv, B] 2. chosen tokens already here stay, pinned
    free = ~(protected[None] | pinned)  # [Hkv, B]
    missing = ~match.any(2)  # [Hkv, m] the others come back,
    rows = (~missing).to(torch.uint8).argsort(dim=1, stable=True)  # [Hkv, m] missing ones first, best page first
    out = rel.masked_fill(~free, float("inf")).argsort(dim=1, stable=True)[:, :m]  # the least relevant free entries
    n = torch.minimum(missing.sum(1), free.sum(1))  # [Hkv] tokens brought back per head
    used = torch.arange(m, device=dev)[None, :] < n[:, None]  # [Hkv, m]
    victims_k = k_slot.gather(1, out[..., None].expand(-1, -1, D))  # [Hkv, m, D] (rows past n unused)
    victims_v = v_slot.gather(1, out[..., None].expand(-1, -1, D))
    back_k = want_k.gather(1, rows.cpu()[..., None].expand(-1, -1, D)).to(dev, k_slot.dtype)  # [Hkv, m, D]
    back_v = want_v.gather(1, rows.cpu()[..., None].expand(-1, -1, D)).to(dev, v_slot.dtype)
    counts = n.tolist()
    if lent is not None:  # gathered for every head at once, then cut per head (views)
        back_pos = (want[rows] + base).cpu()  # [Hkv, m]
        out_pos, out_score = pos_slot.gather(1, out).long().cpu(), score_slot.gather(1, out).cpu()
        out_k, out_v = victims_k.cpu(), victims_v.cpu()
        per = pinned.sum(1).tolist()  # pinned entries per head, in position order
        pin_pos = pos_slot[pinned].long().cpu().split(per)
        pin_score = score_slot[pinned].cpu().split(per)
        for h, c in enumerate(counts):
            lent.back.append(back_pos[h, :c])
            lent.out_pos.append(out_pos[h, :c])
            lent.out_k.append(out_k[h, :c])
            lent.out_v.append(out_v[h, :c])
            lent.out_score.append(out_score[h, :c])
            lent.pinned_pos.append(pin_pos[h])
            lent.pinned_score.append(pin_score[h])
    hh = torch.arange(Hkv, device=dev)[:, None].expand(Hkv, m)[used]  # the (head, row) pairs brought back
    at, row = out[used], rows[used]
    k_slot[hh, at] = back_k[used]
    v_slot[hh, at] = back_v[used]
    pos_slot[hh, at] = (want[row] + base).to(pos_slot.dtype)
    score_slot[hh, at] = PIN_SCORE
    score_slot[pinned] = PIN_SCORE
    _sort_heads(length, k_slot, v_slot, pos_slot, score_slot)  # 4. position order, as eviction expects

    def per_head(t: torch.Tensor) -> list[torch.Tensor]:  # [Hkv, m, D] -> each head's used rows
        return [t[h, :c] for h, c in enumerate(counts)]

    return n.cpu(), tuple(map(per_head, (victims_k, victims_v, back_k, back_v)))


@torch.no_grad()
def recall_layers_ref(
    k_slot: torch.Tensor,  # [L, Hkv, B, D] one slot's layers, written in place
    v_slot: torch.Tensor,  # [L, Hkv, B, D]
    pos_slot: torch.Tensor,  # [L, Hkv, B] int32
    score_slot: torch.Tensor,  # [L, Hkv, B] fp32
    length: int,  # every layer's (a round runs between steps)
    q: torch.Tensor,  # [L, Hkv, M, D] each layer's group queries
    want: torch.Tensor,  # [m] history indices of the chosen pages' tokens, best page first
    want_k: torch.Tensor,  # [L, Hkv, m, D]
    want_v: torch.Tensor,  # [L, Hkv, m, D]
    base: int,
    recent: int,
    sink: int,
    scale: float,
    H: torch.Tensor | None = None,  # [L, Hkv, R, D] fp32, written in place
    z: torch.Tensor | None = None,  # [L, Hkv, R] fp32
    psi: Sequence[LessLayerWeights] | None = None,  # per layer
    lent: Sequence[Lent] | None = None,  # per layer
) -> torch.Tensor:
    """`recall_layer_ref` on every layer of one slot at once (the layers' heads side by side: one
    pass instead of one per layer), then each layer's LESS swap with its own weights. The slot tensors
    may be views (slab.k[:, s]): they are written back. Returns the tokens brought back [L, Hkv]."""
    L, Hkv, B, D = k_slot.shape
    k, v, pos, score = (t.flatten(0, 1).clone() for t in (k_slot, v_slot, pos_slot, score_slot))  # [L * Hkv, ...]
    every = Lent()
    n, (gone_k, gone_v, come_k, come_v) = _recall_heads(
        k, v, pos, score, length, q.flatten(0, 1), want, want_k.flatten(0, 1), want_v.flatten(0, 1), base, recent,
        sink, every)
    for dst, src in ((k_slot, k), (v_slot, v), (pos_slot, pos), (score_slot, score)):
        dst.copy_(src.view(dst.shape))
    for layer in range(L):
        heads = slice(layer * Hkv, (layer + 1) * Hkv)
        if lent is not None and every.back:
            for name in ("back", "out_pos", "out_k", "out_v", "out_score", "pinned_pos", "pinned_score"):
                getattr(lent[layer], name).extend(getattr(every, name)[heads])
        if psi is not None and H is not None and z is not None and gone_k:
            _swap_less(H[layer], z[layer], psi[layer], gone_k[heads], gone_v[heads], come_k[heads], come_v[heads])
    return n.view(L, Hkv)


@torch.no_grad()
def return_layer_ref(
    k_slot: torch.Tensor,  # [Hkv, B, D] one slot's layer, written in place
    v_slot: torch.Tensor,  # [Hkv, B, D]
    pos_slot: torch.Tensor,  # [Hkv, B] int32
    score_slot: torch.Tensor,  # [Hkv, B] fp32
    length: int,
    lent: Lent,  # what the layer's recall round changed
    H: torch.Tensor | None = None,  # [Hkv, R, D] fp32, written in place
    z: torch.Tensor | None = None,  # [Hkv, R] fp32
    psi: LessLayerWeights | None = None,
) -> None:
    """A turn's end on one layer of one slot: the recalled entries still there (pinned, so all of
    them, unless a later round already unpinned them) make room again for the entries they replaced,
    the pinned entries get their scores back, and the LESS state absorbs the recalled tokens and gives
    up the returned ones."""
    dev = k_slot.device
    gone_k, gone_v, come_k, come_v = [], [], [], []
    for h, back in enumerate(lent.back):
        pos = pos_slot[h, :length].long()
        here = torch.isin(pos, back.to(dev)) & (score_slot[h, :length] >= PIN_SCORE)  # still lent
        at = here.nonzero().flatten()[: len(lent.out_pos[h])]
        n = len(at)
        gone_k.append(k_slot[h, at].clone())
        gone_v.append(v_slot[h, at].clone())
        come_k.append(lent.out_k[h][:n].to(dev, k_slot.dtype))
        come_v.append(lent.out_v[h][:n].to(dev, v_slot.dtype))
        k_slot[h, at], v_slot[h, at] = come_k[-1], come_v[-1]
        pos_slot[h, at] = lent.out_pos[h][:n].to(dev, pos_slot.dtype)
        score_slot[h, at] = lent.out_score[h][:n].to(dev)
        pins = lent.pinned_pos[h].to(dev)
        kept = torch.isin(pos_slot[h, :length].long(), pins) & (score_slot[h, :length] >= PIN_SCORE)
        idx = kept.nonzero().flatten()
        order = torch.searchsorted(pins, pos_slot[h, idx].long())  # pinned positions ascend
        score_slot[h, idx] = lent.pinned_score[h].to(dev)[order]
    _sort_heads(length, k_slot, v_slot, pos_slot, score_slot)
    _swap_less(H, z, psi, gone_k, gone_v, come_k, come_v)


@torch.no_grad()
def unread_layer_ref(
    k_slot: torch.Tensor,  # [Hkv, B, D] one slot's layer, written in place
    v_slot: torch.Tensor,  # [Hkv, B, D]
    pos_slot: torch.Tensor,  # [Hkv, B] int32, ascending within [0, length)
    length: int,
    lent: Lent,
    H: torch.Tensor | None = None,  # [Hkv, R, D] fp32, written in place
    z: torch.Tensor | None = None,  # [Hkv, R] fp32
    psi: LessLayerWeights | None = None,
) -> None:
    """A turn's end, after `return_layer_ref`: the re-read tokens get back the K/V their step computed,
    in the slot where it still holds them, and in the LESS state where the reply's eviction absorbed
    the re-read's K/V instead."""
    if lent.read_k is None:  # the re-read did not run at this layer
        return
    dev = k_slot.device
    k = lent.read_k.shape[1]
    positions = torch.arange(lent.read_at, lent.read_at + k, device=dev)  # [k]
    gone_k, gone_v, come_k, come_v = [], [], [], []
    for h in range(k_slot.shape[0]):
        pos = pos_slot[h, :length].long()
        here = torch.isin(positions, pos)  # [k]
        idx = torch.searchsorted(pos, positions[here])
        k_slot[h, idx] = lent.read_k[h, here.cpu()].to(dev, k_slot.dtype)
        v_slot[h, idx] = lent.read_v[h, here.cpu()].to(dev, v_slot.dtype)
        away = (~here).cpu()
        gone_k.append(lent.read_k[h, away].float())  # absorbed as the step computed them
        gone_v.append(lent.read_v[h, away].float())
        come_k.append(lent.new_k[h, away].float())  # instead of as the re-read did
        come_v.append(lent.new_v[h, away].float())
    _swap_less(H, z, psi, gone_k, gone_v, come_k, come_v)
