"""The fast torch path (kernels/fast_attention.py, fast_evict.py: ops impl "torch") == the torch
reference (kernels/reference/, the spec): attention output and mass within the tolerance table,
evict lengths / kept rows / positions / scores exact, LESS H and z within STATE_TOL; the fused
step (attend + evict) against the reference pair, every policy, decode and long chunks, with and
without a host bound on the lengths, and the full policy's per-slot SDPA views."""

from __future__ import annotations

import pytest
import torch

from lessserve.kernels.fast_attention import chunk_attention_fast, decode_attention_fast
from lessserve.kernels.fast_evict import attend_evict_fast, evict_absorb_fast, split_kept
from lessserve.kernels.reference.attention import chunk_attention_ref, decode_attention_ref
from lessserve.kernels.reference.evict import EvictionSpec, evict_absorb_ref
from lessserve.kernels.reference.lowrank import phi_ref

from .cases import EVICT as EVICT_CASES
from .cases import less_state, less_weights, slab_layer, slots
from .conftest import MASS_TOL, OUT_TOL, STATE_TOL, close

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def state_tol(C: int) -> tuple[float, float]:
    """H / z: fp32 sums of up to C victims' psi(k) v in another order than the reference's (whose
    sum also runs over every non-victim as an exact zero): the error grows with C."""
    return STATE_TOL if C <= 32 else (1e-5 * C**0.5, 1e-5)

# (Hq, Hkv, C, D, B, R, dtype, lens)
ATTN = [
    (2, 2, 1, 64, 17, 0, F32, [17]),
    (9, 3, 1, 64, 128, 8, F32, [128, 1, 97, 0, 128]),
    (8, 1, 17, 128, 97, 8, F32, [97, 17, 3]),
    (4, 4, 97, 64, 613, 0, F32, [613, 400]),
    (12, 3, 600, 64, 128, 8, F32, [0, 128]),  # more than one query block
    (9, 3, 32, 64, 128, 8, BF16, [128, 5]),
    (8, 2, 1, 128, 613, 4, F16, [613, 1, 17]),
]


def _garbage_tail(length: torch.Tensor, *caches: torch.Tensor) -> None:
    """Rows past each slot's length hold finite garbage (what a slab keeps there): never counted."""
    for c in caches:
        B = c.shape[2]
        tail = (torch.arange(B, device=c.device)[None, :] >= length[:, None].to(c.device))[:, None, :]
        tail = tail.expand(-1, c.shape[1], -1)
        c[tail] = (torch.rand_like(c[tail].float()) * 50).to(c.dtype)


def _attn_inputs(Hq, Hkv, C, D, B, R, dtype, lens, device):
    n, S = len(lens), len(lens) + 2
    kc, vc = slab_layer(S, Hkv, B, D, dtype, device)
    length, slot_ids = slots(S, lens, B, device)
    _garbage_tail(length, kc, vc)
    q = torch.randn(n, Hq, C, D, device=device).to(dtype)
    kn = torch.randn(n, Hkv, C, D, device=device).to(dtype)
    vn = torch.randn(n, Hkv, C, D, device=device).to(dtype)
    H, z = less_state(S, Hkv, R, D, device) if R else (None, None)
    phi = torch.rand(n, Hq, C, R, device=device) if R else None
    return q, kn, vn, kc, vc, length, slot_ids, D**-0.5, H, z, phi


@pytest.mark.parametrize("bound", ["capacity", "max_len"])
@pytest.mark.parametrize("Hq,Hkv,C,D,B,R,dtype,lens", ATTN)
def test_chunk_attention_fast_matches_reference(Hq, Hkv, C, D, B, R, dtype, lens, bound, device):
    args = _attn_inputs(Hq, Hkv, C, D, B, R, dtype, lens, device)
    max_len = max(lens) + 3 if bound == "max_len" else None
    want = chunk_attention_ref(*args)
    got = chunk_attention_fast(*args, max_len=max_len)
    close(got[0], want[0], OUT_TOL[dtype], "out")
    close(got[1], want[1], MASS_TOL[dtype], "mass_cache")
    close(got[2], want[2], MASS_TOL[dtype], "mass_new")


@pytest.mark.parametrize("Hq,Hkv,C,D,B,R,dtype,lens", [c for c in ATTN if c[2] == 1])
def test_decode_attention_fast_matches_reference(Hq, Hkv, C, D, B, R, dtype, lens, device):
    q, kn, vn, kc, vc, length, slot_ids, scale, H, z, phi = _attn_inputs(Hq, Hkv, C, D, B, R, dtype, lens, device)
    args = (q[:, :, 0], kn[:, :, 0], vn[:, :, 0], kc, vc, length, slot_ids, scale, H, z,
            None if phi is None else phi[:, :, 0])
    want, got = decode_attention_ref(*args), decode_attention_fast(*args)
    for g, w, tol, what in zip(got, want, (OUT_TOL[dtype], MASS_TOL[dtype], MASS_TOL[dtype]),
                               ("out", "mass_cache", "mass_new"), strict=True):
        close(g, w, tol, what)


EVICT = [*EVICT_CASES,  # and prefill chunks of 256 (the fast path's serving size)
         (3, 256, 64, 128, 8, F32, [0, 128, 77], "h2o", 64, 0),
         (3, 256, 64, 128, 8, F32, [0, 128, 77], "lambda", 124, 4)]


def _evict_state(Hkv, C, D, B, R, dtype, lens, device):
    n, S = len(lens), len(lens) + 2
    kc, vc = slab_layer(S, Hkv, B, D, dtype, device)
    pc = torch.randint(0, 10_000, (S, Hkv, B), dtype=torch.int32, device=device)
    sc = torch.rand(S, Hkv, B, device=device)
    length, slot_ids = slots(S, lens, B, device)
    tail = (torch.arange(B, device=device)[None, :] >= length[:, None])[:, None, :].expand(-1, Hkv, -1)
    pc[tail], sc[tail] = -1, 0.0  # the slab's invariant past each length
    _garbage_tail(length, kc, vc)
    H, z = less_state(S, Hkv, R, D, device) if R else (None, None)
    w = less_weights(2 * Hkv, Hkv, D, R, device) if R else None
    kn = torch.randn(n, Hkv, C, D, device=device).to(dtype)
    vn = torch.randn(n, Hkv, C, D, device=device).to(dtype)
    pn = torch.arange(C, device=device)[None].repeat(n, 1) + 20_000
    return [kc, vc, pc, sc], length, slot_ids, kn, vn, pn, H, z, w


def _clone(ts):
    return [None if t is None else t.clone() for t in ts]


def _assert_same_slots(got, want, got_len, want_len, slot_ids, scores: str | None = "exact"):
    """Lengths, kept k / v rows, positions exact; scores exact, "close" (masses from another
    attention implementation) or not compared (None: the full policy never reads them)."""
    assert torch.equal(got_len.cpu(), want_len.cpu()), "lengths differ"
    Hkv, B = got[0].shape[1], got[0].shape[2]
    kept = (torch.arange(B, device=got_len.device)[None, None, :] < got_len[:, None, None]).expand(-1, Hkv, -1)
    for name, g, w in (("k", got[0], want[0]), ("v", got[1], want[1])):
        assert torch.equal(g[slot_ids][kept], w[slot_ids][kept]), f"{name}: kept rows differ"
    assert torch.equal(got[2][slot_ids], want[2][slot_ids]), "pos differs (kept rows or the -1 tail)"
    if scores == "exact":
        assert torch.equal(got[3][slot_ids], want[3][slot_ids]), "scores differ"
    elif scores == "close":
        close(got[3][slot_ids], want[3][slot_ids], MASS_TOL[torch.float32], "scores")


@pytest.mark.parametrize("bound", ["capacity", "max_len"])
@pytest.mark.parametrize("Hkv,C,D,B,R,dtype,lens,mode,recent,sink", EVICT)
def test_evict_absorb_fast_matches_reference(Hkv, C, D, B, R, dtype, lens, mode, recent, sink, bound, device):
    spec = EvictionSpec(mode, B, recent, sink)
    cache, length, slot_ids, kn, vn, pn, H, z, w = _evict_state(Hkv, C, D, B, R, dtype, lens, device)
    n = len(lens)
    mc = torch.rand(n, Hkv, B, device=device) * (torch.arange(B, device=device) < length[slot_ids, None])[:, None]
    mn = torch.rand(n, Hkv, C, device=device)
    mine, (H2, z2) = _clone(cache), _clone((H, z))
    want_len = evict_absorb_ref(*cache, length, slot_ids, kn, vn, pn, mc, mn, spec, H, z, w)
    got_len = evict_absorb_fast(*mine, length, slot_ids, kn, vn, pn, mc, mn, spec, H2, z2, w,
                                max_len=max(lens) if bound == "max_len" else None)
    _assert_same_slots(mine, cache, got_len, want_len, slot_ids)
    if R:
        close(H2, H, state_tol(C), "H")
        close(z2, z, state_tol(C), "z")


@pytest.mark.parametrize("Hkv,C,D,B,R,dtype,lens,mode,recent,sink", EVICT)
def test_attend_evict_fast_matches_reference_step(Hkv, C, D, B, R, dtype, lens, mode, recent, sink, device):
    """The fused step == chunk_attention_ref then evict_absorb_ref on the same state."""
    spec = EvictionSpec(mode, B, recent, sink)
    cache, length, slot_ids, kn, vn, pn, H, z, w = _evict_state(Hkv, C, D, B, R, dtype, lens, device)
    G = 3
    q = torch.randn(len(lens), G * Hkv, C, D, device=device).to(dtype)
    phi = phi_ref(q, less_weights(G * Hkv, Hkv, D, R, device)) if R else None
    mine, (H2, z2) = _clone(cache), _clone((H, z))
    out_want, mc, mn = chunk_attention_ref(q, kn, vn, cache[0], cache[1], length, slot_ids, D**-0.5, H, z, phi)
    want_len = evict_absorb_ref(*cache, length, slot_ids, kn, vn, pn, mc, mn, spec, H, z, w)
    host = None
    if mode == "full":
        host = (slot_ids.tolist(), length[slot_ids].tolist())
    out_got, got_len = attend_evict_fast(q, kn, vn, *mine, length, slot_ids, pn, D**-0.5, spec, H2, z2, phi, w,
                                         max_len=max(lens), host=host)
    close(out_got, out_want, OUT_TOL[dtype], "out")
    _assert_same_slots(mine, cache, got_len, want_len, slot_ids, scores=None if mode == "full" else "close")
    if R:
        close(H2, H, state_tol(C), "H")
        close(z2, z, state_tol(C), "z")


def test_full_policy_views_from_an_empty_slot_and_after_history(device):
    """The full policy's SDPA views: a first chunk (causal), a later chunk (offset mask), decode."""
    Hkv, D, B = 3, 64, 300
    spec = EvictionSpec("full", B, B, 0)
    cache, length, slot_ids, *_ = _evict_state(Hkv, 1, D, B, 0, F32, [0, 0], device)
    mine = _clone(cache)
    mine_len = length.clone()
    for C in (40, 23, 1, 1, 64):
        q = torch.randn(2, 9, C, D, device=device)
        kn, vn = torch.randn(2, Hkv, C, D, device=device), torch.randn(2, Hkv, C, D, device=device)
        pn = length[slot_ids, None].long() + torch.arange(C, device=device)
        want, mc, mn = chunk_attention_ref(q, kn, vn, cache[0], cache[1], length, slot_ids, D**-0.5)
        want_len = evict_absorb_ref(*cache, length, slot_ids, kn, vn, pn, mc, mn, spec)
        got, got_len = attend_evict_fast(q, kn, vn, *mine, mine_len, slot_ids, pn, D**-0.5, spec,
                                         host=(slot_ids.tolist(), mine_len[slot_ids].tolist()))
        close(got, want, OUT_TOL[F32], f"out (chunk {C})")
        _assert_same_slots(mine, cache, got_len, want_len, slot_ids, scores=None)
        length[slot_ids], mine_len[slot_ids] = want_len, got_len


@pytest.mark.parametrize("seed", range(6))
def test_split_kept_picks_what_a_stable_sort_picks(seed):
    """The top-k selection of the fast eviction (split_kept) against its definition: a stable
    descending sort of the priorities keeps the first W (ties: the lower index), then the kept
    valid entries in index order and the kept invalid ones after them. Priorities drawn from a few
    values, inf and -inf, so ties are everywhere."""
    g = torch.Generator().manual_seed(seed)
    n, Hkv, Lk = 3, 2, 41
    W = int(torch.randint(1, Lk, (1,), generator=g))
    values = torch.tensor([float("-inf"), -2.5, -0.0, 0.0, 1.0, 3.0, float("inf")])
    prio = values[torch.randint(0, len(values), (n, Hkv, Lk), generator=g)]
    valid = torch.rand(n, Lk, generator=g) < 0.8
    prio = prio.masked_fill(~valid[:, None, :], float("-inf"))
    keep, vic = split_kept(prio, valid, W)
    order = prio.sort(dim=-1, descending=True, stable=True).indices
    first = order[..., :W]
    ok = valid[:, None, :].expand(n, Hkv, Lk).gather(2, first)
    want = torch.where(ok, first, first + Lk).sort(dim=-1).values
    assert torch.equal(keep, torch.where(want >= Lk, want - Lk, want))
    assert torch.equal(vic.sort(dim=-1).values, order[..., W:].sort(dim=-1).values)
