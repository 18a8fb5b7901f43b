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
