"""The LESS feature maps (torch reference) against their formulas written out here, with scales
that are not 1, widths where rank != heads, and dropout that really drops."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lessserve.kernels.reference.lowrank import LessLayerWeights, phi_ref, psi_ref

Hq, Hkv, D, RH, R = 4, 2, 8, 6, 3  # rank 3: not Hq, not Hkv, not the hidden width


def weights(seed: int = 3) -> LessLayerWeights:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return LessLayerWeights(w1q=r(Hq, D, RH), w2q=r(Hq, RH, R), w1k=r(Hkv, D, RH), w2k=r(Hkv, RH, R),
                            wint=r(Hkv, R, R), s1=r(Hkv, R) * 2, s2=r(Hkv, R) * 3)


def test_phi_and_psi_follow_their_formulas_per_head():
    w, g = weights(), torch.Generator().manual_seed(0)
    q, k = torch.randn(2, Hq, 5, D, generator=g), torch.randn(2, Hkv, 5, D, generator=g)
    assert w.rank == R
    got_phi, got_psi = phi_ref(q, w), psi_ref(k, w)
    for h in range(Hq):
        want = F.gelu(F.gelu(q[:, h] @ w.w1q[h]) @ w.w2q[h]).abs()  # [2, 5, R]
        assert torch.allclose(got_phi[:, h], want, atol=1e-5), h
    for h in range(Hkv):
        a = w.s1[h].abs() * F.gelu(F.gelu(k[:, h] @ w.w1k[h]) @ w.w2k[h])
        want = (a + (a @ w.wint[h]) * w.s2[h]).abs()
        assert torch.allclose(got_psi[:, h], want, atol=1e-4), h


@pytest.mark.parametrize("fn,x_heads", [(phi_ref, Hq), (psi_ref, Hkv)])
def test_dropout_is_applied_in_training_and_off_by_default(fn, x_heads):
    w = weights()
    x = torch.randn(1, x_heads, 64, D, generator=torch.Generator().manual_seed(1))
    plain = fn(x, w)
    assert torch.equal(plain, fn(x, w, dropout=0.0))
    torch.manual_seed(0)
    dropped = fn(x, w, dropout=0.5)
    assert not torch.allclose(dropped, plain, atol=1e-3)  # half the hidden units dropped, the rest scaled


def test_weights_move_whole():
    w = weights()
    h = w.to(dtype=torch.float16)
    assert all(getattr(h, f.name).dtype == torch.float16 for f in dataclasses.fields(w))
    assert torch.allclose(h.s2.float(), w.s2, rtol=1e-3)
