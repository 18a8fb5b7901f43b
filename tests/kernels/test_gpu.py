"""Native CUDA runs of every kernel at serving sizes (skipped cleanly without a GPU). Every output
field is compared, with dtype-aware tolerances: exact for integers, int8 codes, copied sections and
kept rows; conftest's tables for floats that are computed (attention outputs, masses, H, z)."""

from __future__ import annotations

import pytest
import torch

from lessserve.kernels.reference.attention import chunk_attention_ref, decode_attention_ref
from lessserve.kernels.reference.evict import EvictionSpec, evict_absorb_ref
from lessserve.kernels.reference.pack import PackLayout, pack_slots_ref, section_view

from .conftest import MASS_TOL, OUT_TOL, STATE_TOL, close
from .test_attention import _inputs as attn_inputs
from .test_evict import _inputs as evict_inputs
from .test_pack import _slab

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("Hkv,G,D,dtype", [(32, 1, 128, torch.float16), (8, 4, 128, torch.bfloat16),
                                           (3, 3, 64, torch.bfloat16)])
def test_decode_native(Hkv, G, D, dtype):
    from lessserve.kernels.triton import decode_attention

    lens = torch.randint(1, 2048, (32,)).tolist()
    q, kn, vn, *rest = attn_inputs(32, Hkv, G, 1, D, dtype, lens, True, CUDA)
    ins = (q[:, :, 0], kn[:, :, 0], vn[:, :, 0], *rest[:-1], rest[-1][:, :, 0])
    got, want = decode_attention(*ins), decode_attention_ref(*ins)
    close(got[0], want[0], OUT_TOL[dtype], "out")
    close(got[1], want[1], MASS_TOL[dtype], "mass_cache")
    close(got[2], want[2], MASS_TOL[dtype], "mass_new")


@pytest.mark.parametrize("C,dtype", [(16, torch.float16), (256, torch.bfloat16)])
def test_chunk_native(C, dtype):
    from lessserve.kernels.triton import chunk_attention

    args = attn_inputs(4, 8, 4, C, 128, dtype, [0, 17, 613, 1024], True, CUDA)
    got, want = chunk_attention(*args), chunk_attention_ref(*args)
    close(got[0], want[0], OUT_TOL[dtype], "out")
    close(got[1], want[1], MASS_TOL[dtype], "mass_cache")
    close(got[2], want[2], MASS_TOL[dtype], "mass_new")


@pytest.mark.parametrize("C", [1, 64])
def test_evict_native(C):
    from lessserve.kernels.triton import evict_absorb

    B = 512
    kc, vc, pc, sc, length, slot_ids, kn, vn, pn, mc, mn, H, z, w = evict_inputs(
        8, C, 128, B, 8, torch.bfloat16, [B, B - 1, 3, B], CUDA)
    spec = EvictionSpec("h2o", B, B // 2)
    before = [t.clone() for t in (kc, vc, pc, sc, H, z)]
    mine = [t.clone() for t in before]
    want = evict_absorb_ref(kc, vc, pc, sc, length, slot_ids, kn, vn, pn, mc, mn, spec, H, z, w)
    got = evict_absorb(*mine[:4], length, slot_ids, kn, vn, pn, mc, mn, spec, mine[4], mine[5], w)
    assert torch.equal(got, want), "length"
    kept = (torch.arange(B, device=CUDA)[None, None, :] < got[:, None, None]).expand(-1, kc.shape[1], -1)
    for name, g, ref in (("k", mine[0], kc), ("v", mine[1], vc)):
        assert torch.equal(g[slot_ids][kept], ref[slot_ids][kept]), f"{name}: kept rows differ"
    assert torch.equal(mine[2][slot_ids], pc[slot_ids]), "pos (kept rows and the -1 tail)"
    assert torch.equal(mine[3][slot_ids], sc[slot_ids]), "scores (kept rows and the 0 tail)"
    close(mine[4], H, STATE_TOL, "H")
    close(mine[5], z, STATE_TOL, "z")
    others = torch.ones(kc.shape[0], dtype=torch.bool, device=CUDA)
    others[slot_ids] = False
    for name, g, b in zip(("k", "v", "pos", "score", "H", "z"), mine, before, strict=True):
        assert torch.equal(g[others], b[others]), f"{name}: a slot outside the batch changed"


def test_pack_native():
    from lessserve.kernels.triton import pack_slots

    slab = _slab(4, 8, 8, 256, 128, 8, torch.bfloat16, CUDA)
    sid = torch.tensor([5, 1, 7], device=CUDA)
    for quant in ("int8", "none"):
        got, want = pack_slots(*slab, sid, quant), pack_slots_ref(*slab, sid, quant)
        layout = PackLayout.of(slab[0], slab[4], quant)
        for name, (_, _, dt, _) in layout.offsets().items():
            g, w = section_view(got, layout, name), section_view(want, layout, name)
            if name.endswith("_scale"):  # absmax / 127 on the device: within 2 fp32 ulps
                close(g, w, (0.0, 2.0 ** -22), f"{quant} {name}")
            else:  # int8 codes, copied k / v / pos / score / H / z / length
                assert torch.equal(g, w), f"{quant} {name} ({dt}): {int((g != w).sum())} elements differ"
