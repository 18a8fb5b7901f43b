"""Pinned (recalled) entries, score >= PIN_SCORE: the reference keeps every one of them under h2o and
lambda when the spec leaves room, and the fast torch path and the Triton kernel agree with it."""

from __future__ import annotations

import pytest
import torch

from lessserve.kernels.fast_evict import evict_absorb_fast
from lessserve.kernels.reference.evict import PIN_SCORE, EvictionSpec, evict_absorb_ref

from .cases import less_state, less_weights, slab_layer
from .conftest import STATE_TOL, close

# (Hkv, C, D, B, R, mode, recent, sink, pins per head): recent + sink + pins <= B
CASES = [
    (2, 1, 32, 32, 4, "lambda", 12, 4, 16),
    (3, 8, 64, 64, 8, "lambda", 28, 4, 32),
    (2, 16, 32, 48, 0, "h2o", 24, 0, 20),
    (1, 1, 64, 17, 4, "h2o", 8, 0, 9),
]


def _state(Hkv, C, D, B, R, pins, device):
    """Two full slots (one in the batch) whose `pins` random entries per head are pinned."""
    S, n = 3, 2
    kc, vc = slab_layer(S, Hkv, B, D, torch.float32, device)
    pc = (torch.arange(B, device=device) * 3)[None, None].repeat(S, Hkv, 1).to(torch.int32)
    sc = torch.rand(S, Hkv, B, device=device)
    pinned = torch.zeros(S, Hkv, B, dtype=torch.bool, device=device)
    for s in range(S):
        for h in range(Hkv):
            pinned[s, h, torch.randperm(B - 8, device=device)[:pins] + 4] = True  # not the sinks, not the newest
    sc[pinned] = PIN_SCORE
    length = torch.full((S,), B, dtype=torch.int32, device=device)
    slot_ids = torch.tensor([2, 0], device=device)
    kn = torch.randn(n, Hkv, C, D, device=device)
    vn = torch.randn(n, Hkv, C, D, device=device)
    pn = torch.arange(C, device=device)[None].repeat(n, 1) + 10 * B
    mc = torch.rand(n, Hkv, B, device=device)
    mn = torch.rand(n, Hkv, C, device=device)
    H, z = less_state(S, Hkv, R, D, device) if R else (None, None)
    w = less_weights(2 * Hkv, Hkv, D, R, device) if R else None
    return [kc, vc, pc, sc], pinned, length, slot_ids, kn, vn, pn, mc, mn, H, z, w


@pytest.mark.parametrize("impl", ["fast", "triton"])
@pytest.mark.parametrize("Hkv,C,D,B,R,mode,recent,sink,pins", CASES)
def test_pinned_entries_survive_eviction_in_every_implementation(Hkv, C, D, B, R, mode, recent, sink, pins, impl,
                                                                 device):
    spec = EvictionSpec(mode, B, recent, sink)
    cache, pinned, length, slot_ids, kn, vn, pn, mc, mn, H, z, w = _state(Hkv, C, D, B, R, pins, device)
    pinned_pos = [set(cache[2][s, h][pinned[s, h]].tolist()) for s in slot_ids.tolist() for h in range(Hkv)]
    mine = [t.clone() for t in cache]
    H2, z2 = (H.clone(), z.clone()) if R else (None, None)
    want_len = evict_absorb_ref(*cache, length, slot_ids, kn, vn, pn, mc, mn, spec, H, z, w)
    kept = [set(cache[2][s, h].tolist()) for s in slot_ids.tolist() for h in range(Hkv)]
    assert all(p <= k for p, k in zip(pinned_pos, kept, strict=True)), "the reference evicted a pinned entry"
    if mode == "lambda":  # the rest is lambda's: sinks and the most recent entries
        for s in slot_ids.tolist():
            for h in range(Hkv):
                pos = cache[2][s, h]
                unpinned = pos[cache[3][s, h] < PIN_SCORE]
                assert torch.equal(unpinned[:sink], torch.arange(sink, device=device, dtype=pos.dtype) * 3)
                assert int(unpinned[-1]) == 10 * B + C - 1
    if impl == "fast":
        got_len = evict_absorb_fast(*mine, length, slot_ids, kn, vn, pn, mc, mn, spec, H2, z2, w)
    else:
        from lessserve.kernels.triton import evict_absorb

        got_len = evict_absorb(*mine, length, slot_ids, kn, vn, pn, mc, mn, spec, H2, z2, w)
    assert torch.equal(got_len.cpu(), want_len.cpu())
    for name, g, ref in zip(("k", "v", "pos", "score"), mine, cache, strict=True):
        assert torch.equal(g[slot_ids], ref[slot_ids]), f"{name} differs from the reference"
    if R:
        close(H2, H, STATE_TOL, "H")
        close(z2, z, STATE_TOL, "z")
