"""Triton decode / chunk attention == torch reference (outputs and per-key attention mass)."""

from __future__ import annotations

import pytest
import torch

from lessserve.kernels.reference.attention import chunk_attention_ref, decode_attention_ref

from .cases import less_state, slab_layer, slots
from .conftest import MASS_TOL, OUT_TOL, close

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (Hkv, G, D, dtype, lens, less): every listed size / ratio / dtype at least once, not the product.
DECODE = [
    (2, 1, 64, F32, [613], True),
    (2, 3, 128, F16, [1, 17, 97, 0, 613], True),
    (1, 4, 64, BF16, [17, 1, 97, 33, 5], False),
    (1, 8, 128, F32, [97], False),
    (3, 8, 64, BF16, [1], True),
]
# (Hkv, G, C, D, dtype, lens, less); G*C > 64 takes the two-kernel mass path.
CHUNK = [
    (2, 3, 16, 64, F32, [17], True),
    (1, 8, 17, 64, F16, [0, 1, 17, 97, 40], True),
    (2, 4, 37, 128, BF16, [613], False),
    (3, 1, 5, 128, F32, [97, 1, 17, 613, 2], False),
    (1, 1, 97, 64, F32, [17], True),
]


def _inputs(n, Hkv, G, C, D, dtype, lens, less, device, R=8):
    S, B = n + 2, max(max(lens), 1) + 3
    Hq = Hkv * G
    kc, vc = slab_layer(S, Hkv, B, D, dtype, device)
    length, slot_ids = slots(S, lens, B, device)
    q = torch.randn(n, Hq, C, D, device=device).to(dtype)
    kn = torch.randn(n, Hkv, C, D, device=device).to(dtype)
    vn = torch.randn(n, Hkv, C, D, device=device).to(dtype)
    H = z = phi = None
    if less:
        H, z = less_state(S, Hkv, R, D, device)
        phi = torch.rand(n, Hq, C, R, device=device)
    return q, kn, vn, kc, vc, length, slot_ids, D**-0.5, H, z, phi


def _check(got, want, dtype, label):
    errs = [close(got[0], want[0], OUT_TOL[dtype], f"{label} out"),
            close(got[1], want[1], MASS_TOL[dtype], f"{label} mass_cache"),
            close(got[2], want[2], MASS_TOL[dtype], f"{label} mass_new")]
    return errs


@pytest.mark.parametrize("Hkv,G,D,dtype,lens,less", DECODE)
def test_decode_attention_matches_reference(Hkv, G, D, dtype, lens, less, device):
    from lessserve.kernels.triton import decode_attention
    from lessserve.kernels.triton.checks import poisoned_outputs

    args = _inputs(len(lens), Hkv, G, 1, D, dtype, lens, less, device)
    q, kn, vn, *rest = args
    ins = (q[:, :, 0], kn[:, :, 0], vn[:, :, 0], *rest[:-1], None if rest[-1] is None else rest[-1][:, :, 0])
    want = decode_attention_ref(*ins)
    with poisoned_outputs():
        got = decode_attention(*ins)
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape and got[2].shape == want[2].shape
    _check(got, want, dtype, "decode")


@pytest.mark.parametrize("Hkv,G,C,D,dtype,lens,less", CHUNK)
def test_chunk_attention_matches_reference(Hkv, G, C, D, dtype, lens, less, device):
    from lessserve.kernels.triton import chunk_attention
    from lessserve.kernels.triton.checks import poisoned_outputs

    args = _inputs(len(lens), Hkv, G, C, D, dtype, lens, less, device)
    want = chunk_attention_ref(*args)
    with poisoned_outputs():
        got = chunk_attention(*args)
    _check(got, want, dtype, "chunk")


def test_attention_reads_only_valid_cache_rows(device):
    """Cache rows at or past a slot's length may hold anything (NaN): they must not be read."""
    from lessserve.kernels.triton import chunk_attention

    q, kn, vn, kc, vc, length, slot_ids, scale, H, z, phi = _inputs(2, 2, 3, 4, 64, F32, [17, 5], True, device)
    want = chunk_attention_ref(q, kn, vn, kc, vc, length, slot_ids, scale, H, z, phi)
    B = kc.shape[2]
    tail = torch.arange(B, device=device)[None, :] >= length[:, None]  # [S, B]
    kc[tail[:, None, :].expand(-1, kc.shape[1], -1)] = float("nan")
    vc[tail[:, None, :].expand(-1, vc.shape[1], -1)] = float("nan")
    got = chunk_attention(q, kn, vn, kc, vc, length, slot_ids, scale, H, z, phi)
    _check(got, want, F32, "nan-tail")


def test_attention_rejects_bad_inputs(device):
    from lessserve.kernels.triton import chunk_attention
    from lessserve.kernels.triton.checks import KernelInputError

    q, kn, vn, kc, vc, length, slot_ids, scale, H, z, phi = _inputs(1, 2, 2, 3, 64, F32, [5], True, device)
    with pytest.raises(KernelInputError, match="multiple"):
        chunk_attention(q[:, :3], kn, vn, kc, vc, length, slot_ids, scale)
    with pytest.raises(KernelInputError, match="dtypes differ"):
        chunk_attention(q.half(), kn, vn, kc, vc, length, slot_ids, scale)
    with pytest.raises(KernelInputError, match="phi_q"):
        chunk_attention(q, kn, vn, kc, vc, length, slot_ids, scale, H, z, phi[..., :4])


def _one_slot(C: int, D: int = 16, R: int = 4, B: int = 8):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, C, D, generator=g)
    k_new, v_new = torch.randn(1, 1, C, D, generator=g), torch.randn(1, 1, C, D, generator=g)
    k_cache, v_cache = torch.randn(1, 1, B, D, generator=g), torch.randn(1, 1, B, D, generator=g)
    H, z = torch.randn(1, 1, R, D, generator=g), torch.rand(1, 1, R, generator=g) + 0.5
    phi = torch.rand(1, 2, C, R, generator=g) + 0.1
    length, slot_ids = torch.tensor([B // 2]), torch.tensor([0])
    return q, k_new, v_new, k_cache, v_cache, length, slot_ids, H, z, phi


def test_reference_attention_stays_finite_when_every_score_is_very_negative():
    """The shift m' = max(0, m) keeps e^{-m'} <= 1: with every score near -100 the LESS term
    dominates and the output is phi^T H / phi^T z, finite (an unclamped shift overflows to inf / inf)."""
    q, k_new, v_new, k_cache, v_cache, length, slot_ids, H, z, phi = _one_slot(C=1)
    q = torch.ones_like(q)
    k_cache, k_new = -torch.ones_like(k_cache) * 25, -torch.ones_like(k_new) * 25  # q.k * 0.25 = -100
    out, _, _ = chunk_attention_ref(q, k_new, v_new, k_cache, v_cache, length, slot_ids, 0.25, H=H, z=z, phi_q=phi)
    assert torch.isfinite(out).all()
    want = torch.einsum("hcr,rd->hcd", phi[0], H[0, 0]) / torch.einsum("hcr,r->hc", phi[0], z[0, 0])[..., None]
    assert torch.allclose(out[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("given", ["H,z", "phi,H", "phi,z"])
def test_reference_attention_uses_less_only_with_all_three_inputs(given):
    """The LESS term needs phi(q), H and z together; with any one missing the result is the sparse
    attention's (and nothing raises)."""
    q, k_new, v_new, k_cache, v_cache, length, slot_ids, H, z, phi = _one_slot(C=3)
    sparse = chunk_attention_ref(q, k_new, v_new, k_cache, v_cache, length, slot_ids, 0.25)
    kw = {"H": H if "H" in given else None, "z": z if "z" in given else None,
          "phi_q": phi if "phi" in given else None}
    got = chunk_attention_ref(q, k_new, v_new, k_cache, v_cache, length, slot_ids, 0.25, **kw)
    for a, b in zip(got, sparse, strict=True):
        assert torch.equal(a, b)
    full = chunk_attention_ref(q, k_new, v_new, k_cache, v_cache, length, slot_ids, 0.25, H=H, z=z, phi_q=phi)
    assert not torch.allclose(full[0], sparse[0])  # the term matters when all three are there
