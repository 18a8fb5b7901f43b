"""The slot slab's host copies (numpy, on the calling thread) keep every bit, in every dtype."""

import pytest
import torch

from lessserve.workers.slots import STATE_FIELDS, SlotSlab


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_export_load_reset_round_trip_bit_for_bit(dtype):
    slab = SlotSlab(num_layers=2, num_kv_heads=3, head_dim=4, num_slots=3, capacity=5, rank=2,
                    device=torch.device("cpu"), dtype=dtype)
    a, b = slab.alloc(), slab.alloc()
    g = torch.Generator().manual_seed(0)
    for f in ("k", "v", "score", "H", "z"):
        t = getattr(slab, f)
        t[:, a] = torch.randn(t[:, a].shape, generator=g).to(t.dtype)
    slab.pos[:, a] = torch.randint(0, 99, slab.pos[:, a].shape, generator=g, dtype=torch.int32)
    slab.length[a], slab.seen[a] = 4, 17
    state = slab.export(a)  # strided slot views -> contiguous host copies
    assert all(state[f].is_contiguous() and state[f].dtype == getattr(slab, f).dtype for f in STATE_FIELDS)
    slab.load(b, state)
    for f in STATE_FIELDS:
        t = getattr(slab, f)
        assert torch.equal(t[:, b], t[:, a]), f
    assert (int(slab.length[b]), slab.seen[b]) == (4, 17)
    for f in STATE_FIELDS:  # the export is a copy: changing the slot later leaves it alone
        getattr(slab, f)[:, a] = 0
    assert not torch.equal(state["k"], slab.k[:, a])
    slab.reset(b)
    assert all(not getattr(slab, f)[:, b].any() for f in ("k", "v", "score", "H", "z"))
    assert bool((slab.pos[:, b] == -1).all()) and int(slab.length[b]) == 0 and slab.seen[b] == 0
    assert torch.equal(slab.k[:, 2], torch.zeros_like(slab.k[:, 2]))  # the unallocated slot untouched
