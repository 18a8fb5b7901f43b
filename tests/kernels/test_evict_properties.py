"""Property tests of evict-and-absorb (hypothesis), reference and Triton: over any sequence of chunks
into one slot, under h2o / lambda / full with any valid budget, window and sinks,
  - a slot never holds more than `budget` entries, and holds min(seen, budget) of them;
  - its positions are strictly increasing, the tail is empty (pos -1, score 0);
  - the recent window (and lambda's sinks) are always kept;
  - h2o keeps the heaviest: no evicted entry outscored a kept one outside the window;
  - kept keys, values and scores are those of their positions (score = its accumulated mass);
  - H and z grew by exactly the sum of psi(k)^T v and psi(k) over the evicted entries.
psi is recomputed here with the oracle's float64 maps (tests/oracle), not the reference's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lessserve.kernels import ops
from lessserve.kernels.reference.evict import EvictionSpec
from tests.oracle.less_oracle import psi_map

from .cases import less_weights

Hkv, D, R, S = 2, 8, 3, 3
SLOT = 1  # the slot under test; its neighbours must stay untouched


@st.composite
def scenarios(draw):
    mode = draw(st.sampled_from(["h2o", "lambda", "full"]))
    B = draw(st.integers(2, 12))
    if mode == "h2o":
        spec = EvictionSpec("h2o", B, draw(st.integers(1, B - 1)))
    elif mode == "lambda":
        sink = draw(st.integers(1, B - 1))
        spec = EvictionSpec("lambda", B, B - sink, sink)
    else:
        spec = EvictionSpec("full", B, B)
    chunks = draw(st.lists(st.integers(1, 2 * B + 1), min_size=1, max_size=5))
    if mode == "full":  # the caller guarantees it fits
        total, kept = 0, []
        for c in chunks:
            if total + c > B:
                break
            total += c
            kept.append(c)
        chunks = kept or [B]
    ties = draw(st.booleans())  # masses on a coarse grid: many equal scores
    return spec, chunks, ties, draw(st.integers(0, 2**31 - 1))


def check_step(spec, before, after, candidates, new_len, w) -> None:
    """before/after: this slot's (k, v, pos, score, H, z); candidates: per KV head, every entry
    before eviction as {pos: (k [D], v [D], accumulated score)}; new_len: the returned length."""
    k, v, pos, score, H, z = after
    n = int(new_len)
    for h, merged in enumerate(candidates):
        T = max(merged) + 1
        assert n == min(len(merged), spec.budget) <= spec.budget
        p = pos[h, :n].tolist()
        assert all(a < b for a, b in zip(p, p[1:], strict=False)), f"positions not increasing: {p}"
        assert (pos[h, n:] == -1).all() and (score[h, n:] == 0).all(), "tail not empty"
        assert set(p) <= set(merged)
        recent = [j for j in merged if j >= T - spec.recent]
        assert set(recent) <= set(p), f"recent window {recent} not kept: {p}"
        if spec.mode == "lambda":
            assert {j for j in merged if j < spec.sink} <= set(p), f"sinks not kept: {p}"
        for i, j in enumerate(p):
            mk, mv, ms = merged[j]
            assert torch.equal(k[h, i], mk) and torch.equal(v[h, i], mv), f"k/v of position {j} moved"
            assert torch.allclose(score[h, i], ms, rtol=1e-6, atol=1e-6), f"score of position {j}"
        victims = sorted(set(merged) - set(p))
        if spec.mode == "h2o" and victims:
            heavy = [float(merged[j][2]) for j in p if j < T - spec.recent]
            assert not heavy or min(heavy) >= max(float(merged[j][2]) for j in victims)
        if w is not None:
            wk = {f: getattr(w, f)[h].double() for f in ("w1k", "w2k", "wint", "s1", "s2")}
            dH = torch.zeros(R, D, dtype=torch.float64)
            dz = torch.zeros(R, dtype=torch.float64)
            for j in victims:
                f = psi_map(merged[j][0].double(), wk)
                dH += torch.outer(f, merged[j][1].double())
                dz += f
            torch.testing.assert_close(H[h].double() - before[4][h].double(), dH, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(z[h].double() - before[5][h].double(), dz, rtol=1e-5, atol=1e-5)


def run(impl: str, spec, chunks, ties, seed, less: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    B = spec.budget
    kc, vc = torch.zeros(S, Hkv, B, D), torch.zeros(S, Hkv, B, D)
    pc, sc = torch.full((S, Hkv, B), -1, dtype=torch.int32), torch.zeros(S, Hkv, B)
    length = torch.zeros(S, dtype=torch.int32)
    H, z = (torch.rand(S, Hkv, R, D, generator=g), torch.rand(S, Hkv, R, generator=g)) if less else (None, None)
    torch.manual_seed(seed)
    w = less_weights(2 * Hkv, Hkv, D, R, torch.device("cpu"), hidden=5) if less else None
    mass = (lambda *s: torch.randint(0, 4, s, generator=g).float() / 4) if ties else \
        (lambda *s: torch.rand(*s, generator=g))
    seen, sid = 0, torch.tensor([SLOT])
    for C in chunks:
        ln = int(length[SLOT])
        kn, vn = torch.randn(1, Hkv, C, D, generator=g), torch.randn(1, Hkv, C, D, generator=g)
        mc, mn = mass(1, Hkv, B), mass(1, Hkv, C)
        candidates = [
            {int(pc[SLOT, h, i]): (kc[SLOT, h, i].clone(), vc[SLOT, h, i].clone(), sc[SLOT, h, i] + mc[0, h, i])
             for i in range(ln)} | {seen + t: (kn[0, h, t], vn[0, h, t], mn[0, h, t]) for t in range(C)}
            for h in range(Hkv)]
        others = [t[[0, 2]].clone() for t in (kc, vc, pc, sc)]
        before = [t[SLOT].clone() if t is not None else None for t in (kc, vc, pc, sc, H, z)]
        new_len = ops.evict_absorb(kc, vc, pc, sc, length, sid, kn, vn, torch.arange(seen, seen + C)[None], mc, mn,
                                   spec, H=H, z=z, psi=w, impl=impl)
        after = [t[SLOT] if t is not None else None for t in (kc, vc, pc, sc, H, z)]
        check_step(spec, before, after, candidates, new_len[0], w)
        assert all(torch.equal(t[[0, 2]], o) for t, o in zip((kc, vc, pc, sc), others, strict=True))
        length[SLOT] = new_len[0]
        seen += C


PROPS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=80, **PROPS)
@given(case=scenarios(), less=st.booleans())
def test_reference_eviction_invariants(case, less):
    run("torch", *case, less)


@pytest.mark.parametrize("less", [True, False])
@settings(max_examples=25, **PROPS)
@given(case=scenarios())
def test_triton_eviction_invariants(case, less):
    run("triton", *case, less)
