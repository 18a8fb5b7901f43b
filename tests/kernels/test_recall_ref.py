"""kernels/reference/recall.py: a round over every layer of a slot at once (`recall_layers_ref`) is the
per-layer round (`recall_layer_ref`) run layer by layer: the same slot entries, LESS state, counts
and what each layer lends to the turn."""

from __future__ import annotations

import pytest
import torch

from lessserve.kernels.reference.evict import PIN_SCORE
from lessserve.kernels.reference.recall import Lent, recall_layer_ref, recall_layers_ref
from lessserve.workers.less_weights import LessWeights

L, HKV, G, B, D, T = 3, 2, 2, 16, 8, 64  # layers, KV heads, queries per group, slot budget, head dim, history


def slot(g: torch.Generator, length: int):
    """A slot whose heads hold `length` ascending history positions each (some pinned), its K/V, scores."""
    pos = torch.stack([torch.stack([torch.randperm(T, generator=g)[:length].sort().values for _ in range(HKV)])
                       for _ in range(L)]).int()  # [L, Hkv, length]
    pad = B - length
    pos = torch.cat([pos, torch.zeros(L, HKV, pad, dtype=torch.int32)], -1)
    score = torch.rand(L, HKV, B, generator=g)
    score[0, 1, 3] = PIN_SCORE  # a pin a turn's end did not return
    return torch.randn(L, HKV, B, D, generator=g), torch.randn(L, HKV, B, D, generator=g), pos, score


@pytest.mark.parametrize("length,less", [(B, True), (B, False), (B - 3, True)])  # B - 3: below budget, nothing to do
def test_a_round_over_every_layer_at_once_is_the_round_layer_by_layer(length, less):
    g = torch.Generator().manual_seed(length + less)
    k, v, pos, score = slot(g, length)
    q = torch.randn(L, HKV, G * 4, D, generator=g)
    want = torch.tensor([40, 41, 42, 43, 8, 9, 10, 11])  # two pages, best first (some may be in the slot)
    hk, hv = torch.randn(L, HKV, len(want), D, generator=g), torch.randn(L, HKV, len(want), D, generator=g)
    w = LessWeights.random(L, HKV * G, HKV, D, rank=4, hidden=8, seed=3, scale_init=1.0, model="t") if less else None
    H, z = torch.randn(L, HKV, 4, D, generator=g), torch.randn(L, HKV, 4, generator=g)
    one = [t.clone() for t in (k, v, pos, score, H, z)]
    lent_one = [Lent() for _ in range(L)]
    n_one = torch.stack([recall_layer_ref(
        one[0][i], one[1][i], one[2][i], one[3][i], length, q[i], want, hk[i], hv[i], 0, 4, 0, 0.3,
        H=one[4][i] if less else None, z=one[5][i] if less else None, psi=w.layers[i] if less else None,
        lent=lent_one[i]) for i in range(L)])
    every = [t.clone() for t in (k, v, pos, score, H, z)]
    lent_every = [Lent() for _ in range(L)]
    n_every = recall_layers_ref(*every[:4], length, q, want, hk, hv, 0, 4, 0, 0.3, H=every[4] if less else None,
                                z=every[5] if less else None, psi=w.layers if less else None, lent=lent_every)
    assert torch.equal(n_every, n_one) and (int(n_one.sum()) > 0) == (length == B)
    for a, b in zip(every, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(lent_every, lent_one, strict=True):
        for name in ("back", "out_pos", "out_k", "out_v", "out_score", "pinned_pos", "pinned_score"):
            got, want_ = getattr(a, name), getattr(b, name)
            assert len(got) == len(want_) and all(torch.equal(x, y) for x, y in zip(got, want_, strict=True)), name
