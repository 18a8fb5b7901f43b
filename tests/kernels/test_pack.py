"""int8 codec and slot pack / unpack: Triton == torch reference; round trips are exact ("none") or
bounded by half a quantisation step ("int8"); the LESS state is never quantised."""

from __future__ import annotations

import pytest
import torch

from lessserve.kernels import ops
from lessserve.kernels.reference.pack import (
    PackError,
    PackLayout,
    dequantize_int8_ref,
    pack_slots_ref,
    quantize_int8_ref,
    unpack_slot_ref,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _slab(L, S, Hkv, B, D, R, dtype, device):
    k = torch.randn(L, S, Hkv, B, D, device=device).to(dtype) * 3
    v = torch.randn(L, S, Hkv, B, D, device=device).to(dtype)
    pos = torch.randint(-1, 5000, (L, S, Hkv, B), dtype=torch.int32, device=device)
    score = torch.rand(L, S, Hkv, B, device=device)
    H = torch.randn(L, S, Hkv, R, D, device=device)
    z = torch.rand(L, S, Hkv, R, device=device)
    length = torch.randint(0, B + 1, (S,), dtype=torch.int32, device=device)
    return [k, v, pos, score, H, z, length]


@pytest.mark.parametrize("shape,dtype", [((3, 17, 64), F32), ((2, 97, 128), F16), ((1, 1, 64), BF16),
                                         ((5, 4, 613, 64), F32)])
def test_quantize_int8_triton_matches_reference(shape, dtype, device):
    from lessserve.kernels.triton import dequantize_int8, quantize_int8
    from lessserve.kernels.triton.checks import poisoned_outputs

    x = (torch.randn(shape, device=device) * 4).to(dtype)
    x[..., 0, :] = 0  # an all-zero row: scale 1, codes 0
    q_ref, s_ref = quantize_int8_ref(x)
    with poisoned_outputs():
        q, s = quantize_int8(x)
        y = dequantize_int8(q, s, dtype)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == x.shape[:-1]
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    y_ref = dequantize_int8_ref(q_ref, s_ref, dtype)
    if dtype == BF16 and not torch.cuda.is_available():  # the interpreter's fp32 -> bf16 cast truncates: 1 ulp
        assert ((y.float() - y_ref.float()).abs() <= 2.0 ** -7 * y_ref.float().abs()).all()
    else:
        assert torch.equal(y.float(), y_ref.float())
    tol = {F32: 0.0, F16: 1e-3, BF16: 1e-2}[dtype]
    err = (y.float() - x.float()).abs()
    assert (err <= s[..., None] / 2 + tol * x.float().abs() + 1e-6).all()


def test_ops_codec_names_dispatch(device):
    x = torch.randn(2, 3, 9, 64, device=device)
    q, s = ops.quantize_int8(x, impl="torch")
    y = ops.dequantize_int8(q, s, torch.float16, impl="torch")
    assert y.dtype == torch.float16 and y.shape == x.shape
    q2, s2 = ops.quantize_int8(x, impl="triton")
    assert torch.equal(q, q2) and torch.equal(s, s2)
    assert torch.equal(ops.dequantize_int8(q2, s2, torch.float32, impl="triton"),
                       ops.dequantize_int8(q, s, torch.float32, impl="torch"))


@pytest.mark.parametrize("quant,dtype,slots", [("none", F16, [1]), ("int8", F32, [0, 3, 2]),
                                               ("int8", BF16, [2, 0, 1, 3, 4])])
def test_pack_unpack_triton_matches_reference(quant, dtype, slots, device):
    from lessserve.kernels.triton import pack_slots, unpack_slot

    L, S, Hkv, B, D, R = 3, 6, 2, 17, 64, 8
    slab = _slab(L, S, Hkv, B, D, R, dtype, device)
    sid = torch.tensor(slots, dtype=torch.long, device=device)
    ref = pack_slots_ref(*slab, sid, quant)
    got = pack_slots(*slab, sid, quant)
    layout = PackLayout.of(slab[0], slab[4], quant)
    assert got.shape == ref.shape == (len(slots), layout.record_bytes)
    assert torch.equal(got, ref)  # every dtype: codes, scales and copied sections byte for byte
    # restore record j into the free slot 5 with both implementations
    for j, s in enumerate(slots):
        a = [t.clone() for t in slab]
        b = [t.clone() for t in slab]
        for t in a[:6] + b[:6]:
            t[:, 5] = t[:, 5].fill_(-3) if not t.dtype.is_floating_point else t[:, 5].fill_(float("nan"))
        unpack_slot_ref(ref[j], *a, 5, quant)
        unpack_slot(got[j], *b, 5, quant)
        for name, ta, tb, orig in zip(("k", "v", "pos", "score", "H", "z"), a, b, slab, strict=False):
            if dtype == BF16 and quant == "int8" and name in ("k", "v") and not torch.cuda.is_available():
                ulp = 2.0 ** -7 * ta[:, 5].float().abs()  # one bf16 ulp: the interpreter's fp32 -> bf16 truncates
                assert ((ta[:, 5].float() - tb[:, 5].float()).abs() <= ulp).all(), name
            else:
                assert torch.equal(ta[:, 5], tb[:, 5]), f"{name}: Triton unpack != reference"
            if name in ("pos", "score", "H", "z") or quant == "none":
                assert torch.equal(tb[:, 5], orig[:, s]), f"{name} must round-trip exactly"
            else:
                amax = orig[:, s].float().abs().amax(-1, keepdim=True)
                bound = amax / 127 / 2 + {F32: 1e-6, BF16: 1e-2 * amax}.get(dtype, 1e-3 * amax)
                assert ((tb[:, 5].float() - orig[:, s].float()).abs() <= bound).all(), name
        assert int(b[6][5]) == int(slab[6][s])


def test_int8_pack_is_smaller_and_state_stays_fp32():
    none = PackLayout(30, 3, 128, 64, 8, torch.bfloat16, "none")
    int8 = PackLayout(30, 3, 128, 64, 8, torch.bfloat16, "int8")
    assert int8.record_bytes < 0.6 * none.record_bytes
    assert int8.offsets()["H"][2] == torch.float32 and int8.offsets()["z"][2] == torch.float32
    with pytest.raises(PackError):
        PackLayout(1, 1, 1, 64, 1, torch.float32, "fp4")


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_layout_is_the_documented_one_byte_for_byte(quant):
    """Sections in the module docstring's order, each at the first 16-byte boundary after the
    previous one (sizes that are multiples of 16 leave no gap), `length` one int32; computed here
    independently of PackLayout.offsets."""
    L, Hkv, B, D, R = 2, 3, 16, 8, 4  # k: 2*3*16*8*2 = 1536 bytes (a multiple of 16); z: 96; length: 4
    lay = PackLayout(L, Hkv, B, D, R, torch.float16, quant)
    want = [("k", 1 if quant == "int8" else 2, (L, Hkv, B, D))]
    if quant == "int8":
        want.append(("k_scale", 4, (L, Hkv, B)))
    want.append(("v", 1 if quant == "int8" else 2, (L, Hkv, B, D)))
    if quant == "int8":
        want.append(("v_scale", 4, (L, Hkv, B)))
    want += [("pos", 4, (L, Hkv, B)), ("score", 4, (L, Hkv, B)), ("H", 4, (L, Hkv, R, D)), ("z", 4, (L, Hkv, R)),
             ("length", 4, (1,))]
    off, got = 0, lay.offsets()
    assert list(got) == [n for n, _, _ in want]
    for name, item, shape in want:
        size = item * int(torch.tensor(shape).prod())
        assert got[name][:2] == (off, size) and got[name][3] == shape, name
        off += (size + 15) // 16 * 16
    assert lay.record_bytes == off
    with pytest.raises(AttributeError):  # a layout is a value: frozen
        lay.B = 32


def test_malformed_slabs_and_buffers_are_refused():
    lay = PackLayout(1, 1, 4, 8, 2, torch.float32, "none")
    k5, H5 = torch.zeros(1, 2, 1, 4, 8), torch.zeros(1, 2, 1, 2, 8)
    assert PackLayout.of(k5, H5, "none") == lay
    with pytest.raises(PackError):
        PackLayout.of(k5[0], H5, "none")  # k not layer-major, H fine
    with pytest.raises(PackError):
        PackLayout.of(k5, H5[0], "none")
    from lessserve.kernels.reference.pack import section_view

    with pytest.raises(PackError):  # uint8, 2-d, but not one record wide
        section_view(torch.zeros(2, lay.record_bytes + 16, dtype=torch.uint8), lay, "k")
    with pytest.raises(PackError):
        section_view(torch.zeros(2, lay.record_bytes, dtype=torch.int8), lay, "k")
    assert section_view(torch.zeros(2, lay.record_bytes, dtype=torch.uint8), lay, "k").shape == (2, 1, 1, 4, 8)
