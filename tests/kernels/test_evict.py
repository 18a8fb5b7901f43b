"""Triton evict-and-absorb == torch reference: lengths, kept rows, positions, scores, H and z."""

from __future__ import annotations

import pytest
import torch

from lessserve.kernels.reference.evict import EvictionSpec, evict_absorb_ref

from .cases import EVICT, less_state, less_weights, slab_layer, slots
from .conftest import STATE_TOL, close

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16



def _inputs(Hkv, C, D, B, R, dtype, lens, device):
    n, S = len(lens), len(lens) + 2
    kc, vc = slab_layer(S, Hkv, B, D, dtype, device)
    pc = torch.randint(0, 10_000, (S, Hkv, B), dtype=torch.int32, device=device)
    sc = torch.rand(S, Hkv, B, device=device)
    length, slot_ids = slots(S, lens, B, device)
    kn = torch.randn(n, Hkv, C, D, device=device).to(dtype)
    vn = torch.randn(n, Hkv, C, D, device=device).to(dtype)
    pn = torch.arange(C, device=device)[None].repeat(n, 1) + 20_000
    mc = torch.rand(n, Hkv, B, device=device)
    mn = torch.rand(n, Hkv, C, device=device)
    H, z = less_state(S, Hkv, R, D, device) if R else (None, None)
    w = less_weights(2 * Hkv, Hkv, D, R, device) if R else None
    return kc, vc, pc, sc, length, slot_ids, kn, vn, pn, mc, mn, H, z, w


def _poison_tail(kc, vc, pc, sc, length):
    """Rows past each slot's length: NaN keys/values/scores, sentinel positions. The kernel must
    neither read them nor leave them unwritten where the result has entries."""
    B = kc.shape[2]
    tail = (torch.arange(B, device=kc.device)[None, :] >= length[:, None])[:, None, :].expand(-1, kc.shape[1], -1)
    kc[tail] = float("nan")
    vc[tail] = float("nan")
    pc[tail] = -7
    sc[tail] = float("nan")


@pytest.mark.parametrize("Hkv,C,D,B,R,dtype,lens,mode,recent,sink", EVICT)
def test_evict_absorb_matches_reference(Hkv, C, D, B, R, dtype, lens, mode, recent, sink, device):
    from lessserve.kernels.triton import evict_absorb

    spec = EvictionSpec(mode, B, recent, sink)
    kc, vc, pc, sc, length, slot_ids, kn, vn, pn, mc, mn, H, z, w = _inputs(Hkv, C, D, B, R, dtype, lens, device)
    mine = [t.clone() for t in (kc, vc, pc, sc)]
    _poison_tail(*mine, length)
    before = [t.clone() for t in mine]
    H2, z2 = (H.clone(), z.clone()) if R else (None, None)
    want_len = evict_absorb_ref(kc, vc, pc, sc, length, slot_ids, kn, vn, pn, mc, mn, spec, H, z, w)
    got_len = evict_absorb(*mine, length, slot_ids, kn, vn, pn, mc, mn, spec, H2, z2, w)
    assert torch.equal(got_len.cpu(), want_len.cpu())
    kept = (torch.arange(B, device=device)[None, None, :] < got_len[:, None, None])  # [n, 1, B]
    kept = kept.expand(-1, Hkv, -1)
    for name, g, ref in (("k", mine[0], kc), ("v", mine[1], vc)):
        assert torch.equal(g[slot_ids][kept], ref[slot_ids][kept]), f"{name}: kept rows differ"
    assert torch.equal(mine[2][slot_ids], pc[slot_ids]), "pos differs (kept rows or the -1 tail)"
    assert torch.equal(mine[3][slot_ids], sc[slot_ids]), "scores differ"
    others = torch.ones(kc.shape[0], dtype=torch.bool, device=device)
    others[slot_ids] = False
    for g, b in zip(mine, before, strict=True):  # slots not in the batch are untouched
        same = lambda t: t.nan_to_num(7.0) if t.is_floating_point() else t  # noqa: E731
        assert torch.equal(same(g[others]), same(b[others]))
    if R:
        close(H2, H, STATE_TOL, "H")
        close(z2, z, STATE_TOL, "z")


def test_evict_rejects_bad_spec(device):
    from lessserve.kernels.triton import evict_absorb
    from lessserve.kernels.triton.checks import KernelInputError

    kc, vc, pc, sc, length, slot_ids, kn, vn, pn, mc, mn, H, z, w = _inputs(1, 2, 64, 16, 0, F32, [3], device)
    with pytest.raises(KernelInputError, match="budget"):
        evict_absorb(kc, vc, pc, sc, length, slot_ids, kn, vn, pn, mc, mn, EvictionSpec("h2o", 8, 4))
    with pytest.raises(KernelInputError, match="recent"):
        evict_absorb(kc, vc, pc, sc, length, slot_ids, kn, vn, pn, mc, mn, EvictionSpec("lambda", 16, 14, 4))
