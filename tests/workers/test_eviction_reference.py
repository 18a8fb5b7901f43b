"""The reference evict-and-absorb and attention ops on hand-built inputs."""

import math

import torch

from lessserve.kernels.reference.attention import chunk_attention_ref
from lessserve.kernels.reference.evict import EvictionSpec, evict_absorb_ref
from lessserve.kernels.reference.lowrank import psi_ref
from tests.conftest import TINY, tiny_less


def slab(S=1, H=1, B=8, D=4):
    return (torch.zeros(S, H, B, D), torch.zeros(S, H, B, D), torch.full((S, H, B), -1, dtype=torch.int32),
            torch.zeros(S, H, B), torch.zeros(S, dtype=torch.int32))


def fill(spec, scores_new, D=4, H_state=None, z_state=None, psi=None):
    """Push len(scores_new) tokens into an empty slot of capacity spec.budget in one chunk."""
    B = spec.budget
    k, v, pos, score, length = slab(B=B, D=D, H=scores_new.shape[0])
    C = scores_new.shape[-1]
    kn = torch.randn(1, scores_new.shape[0], C, D)
    vn = torch.randn(1, scores_new.shape[0], C, D)
    new_len = evict_absorb_ref(k, v, pos, score, length, torch.tensor([0]), kn, vn, torch.arange(C)[None],
                               torch.zeros(1, scores_new.shape[0], B), scores_new[None], spec,
                               H=H_state, z=z_state, psi=psi)
    return pos[0], score[0], new_len, kn, vn


def test_h2o_keeps_heaviest_and_recent_window():
    spec = EvictionSpec("h2o", budget=6, recent=3)
    s = torch.tensor([[0.1, 9.0, 0.2, 7.0, 0.3, 8.0, 0.0, 0.0, 0.0, 0.0]])  # 10 tokens, one KV head
    pos, score, n, *_ = fill(spec, s)
    assert int(n[0]) == 6
    assert pos[0].tolist() == [1, 3, 5, 7, 8, 9]  # top-3 scores (1, 3, 5) + last 3, in position order
    assert score[0, :3].tolist() == [9.0, 7.0, 8.0]


def test_lambda_keeps_sinks_and_recent_window():
    spec = EvictionSpec("lambda", budget=6, recent=4, sink=2)
    s = torch.tensor([[5.0] * 10])
    pos, _, n, *_ = fill(spec, s)
    assert pos[0].tolist() == [0, 1, 6, 7, 8, 9]


def test_h2o_per_head_choices_differ():
    spec = EvictionSpec("h2o", budget=4, recent=2)
    s = torch.tensor([[9.0, 0.0, 0.0, 8.0, 0, 0], [0.0, 9.0, 8.0, 0.0, 0, 0]])
    pos, *_ = fill(spec, s)
    assert pos[0].tolist() == [0, 3, 4, 5] and pos[1].tolist() == [1, 2, 4, 5]


def test_victims_are_absorbed_into_less_state():
    w = tiny_less(TINY).layers[0]
    Hkv, D, R = TINY.num_kv_heads, TINY.head_dim, w.rank
    spec = EvictionSpec("lambda", budget=4, recent=3, sink=1)
    Hs, zs = torch.zeros(1, Hkv, R, D), torch.zeros(1, Hkv, R)
    pos, _, _, kn, vn = fill(spec, torch.zeros(Hkv, 7), D=D, H_state=Hs, z_state=zs, psi=w)
    victims = [1, 2, 3]
    f = psi_ref(kn[0][:, victims], w)  # [Hkv, 3, R]
    assert torch.allclose(Hs[0], torch.einsum("htr,htd->hrd", f, vn[0][:, victims]), atol=1e-5)
    assert torch.allclose(zs[0], f.sum(1), atol=1e-5)
    assert pos[0].tolist() == [0, 4, 5, 6]


def test_attention_matches_less_formula():
    torch.manual_seed(0)
    n, Hq, Hkv, B, D, R = 1, 2, 1, 5, 8, 3
    q = torch.randn(n, Hq, 1, D)
    kc, vc = torch.randn(1, Hkv, B, D), torch.randn(1, Hkv, B, D)
    kn, vn = torch.randn(n, Hkv, 1, D), torch.randn(n, Hkv, 1, D)
    H, z = torch.rand(1, Hkv, R, D), torch.rand(1, Hkv, R)
    phi = torch.rand(n, Hq, 1, R)
    length = torch.tensor([3])
    out, mc, mn = chunk_attention_ref(q, kn, vn, kc, vc, length, torch.tensor([0]), D ** -0.5, H, z, phi)
    for h in range(Hq):
        keys = torch.cat([kc[0, 0, :3], kn[0, 0]])
        vals = torch.cat([vc[0, 0, :3], vn[0, 0]])
        s = keys @ q[0, h, 0] / math.sqrt(D)
        m = s.max()
        e = torch.exp(s - m)
        ref = (e @ vals + math.exp(-m) * phi[0, h, 0] @ H[0, 0]) / (e.sum() + math.exp(-m) * phi[0, h, 0] @ z[0, 0])
        assert torch.allclose(out[0, h, 0], ref, atol=1e-5)
    assert torch.allclose(mc[0, 0, :3].sum() + mn.sum(), torch.tensor(float(Hq)), atol=1e-5)
    assert float(mc[0, 0, 3:].abs().sum()) == 0.0  # slots past length get no mass


def test_spec_defaults_and_immutability():
    import dataclasses

    import pytest

    spec = EvictionSpec("h2o", budget=4, recent=2)
    assert spec.sink == 0  # h2o keeps no sinks unless asked: position 0 is evictable
    pos, *_ = fill(spec, torch.tensor([[0.0, 9.0, 8.0, 0.0, 0.0, 0.0]]))
    assert pos[0].tolist() == [1, 2, 4, 5]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.budget = 8


def test_absorption_needs_psi_h_and_z_together():
    """Without all three LESS inputs eviction absorbs nothing (and does not fail)."""
    w = tiny_less(TINY).layers[0]
    Hkv, D, R = TINY.num_kv_heads, TINY.head_dim, w.rank
    spec = EvictionSpec("lambda", budget=4, recent=3, sink=1)
    for kw in ({"psi": w}, {"psi": w, "H_state": torch.zeros(1, Hkv, R, D)},
               {"psi": w, "z_state": torch.zeros(1, Hkv, R)},
               {"H_state": torch.zeros(1, Hkv, R, D), "z_state": torch.zeros(1, Hkv, R)}):
        pos, *_ = fill(spec, torch.zeros(Hkv, 7), D=D, **kw)
        assert pos[0].tolist() == [0, 4, 5, 6]
        for state in ("H_state", "z_state"):
            if state in kw:
                assert not kw[state].any(), (list(kw), state)


def test_append_clears_stale_rows_past_the_new_length():
    """The append path (room for the chunk) leaves every row past the new length empty, also rows a
    caller left stale (capacity 8, head dim 4: the tail is measured along the cache, not along D)."""
    spec = EvictionSpec("h2o", budget=8, recent=4)
    k, v, pos, score, length = slab(B=8, D=4)
    length[0] = 2
    pos[0, 0] = torch.tensor([0, 1, 7, 7, 7, 7, 7, 7], dtype=torch.int32)  # rows 2.. are stale
    score[0, 0] = torch.tensor([1.0, 2.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    new_len = evict_absorb_ref(k, v, pos, score, length, torch.tensor([0]), torch.randn(1, 1, 3, 4),
                               torch.randn(1, 1, 3, 4), torch.tensor([[2, 3, 4]]), torch.zeros(1, 1, 8),
                               torch.full((1, 1, 3), 0.5), spec)
    assert int(new_len[0]) == 5
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    assert score[0, 0].tolist() == [1.0, 2.0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0]
