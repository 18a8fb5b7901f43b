"""The compile switch: decode through the bucketed, torch.compile'd per-layer step == the eager path.

The compiled step reads each slot's whole capacity (one shape per bucket), so for sessions still
below budget it goes through evict-and-absorb where the eager path appends: the states must agree.
"""

from __future__ import annotations

import pytest
import torch

from lessserve.workers.compiled import compiled_attend
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.slots import STATE_FIELDS
from tests.conftest import tiny_less
from tests.workers.replay import decode_schedule

STEPS = [[0, 1, 2], [1], [0, 1, 2], [2], [0, 2, 1]]  # buckets 4, 1, 4, 1, 4 (max_slots 4: buckets 1, 2, 4)


def _engine(ckpt, policy: str, compile: bool, less=None, kernels: str = "torch") -> Engine:
    cfg = EngineConfig(model="tiny", policy=policy, budget=16, prefill_chunk=8, max_slots=4, max_context=512,
                       kernels=kernels, dtype="float32", device="cpu", compile=compile)
    return Engine(cfg, checkpoint=ckpt, less=less)


@pytest.mark.parametrize("policy", ["h2o+less", "lambda"])
def test_compiled_decode_matches_eager(tiny_ckpt, policy):
    less = tiny_less() if policy.endswith("+less") else None
    g = torch.Generator().manual_seed(3)
    # one session past its budget (evicting, LESS absorbing), two still below it (the eager path appends)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (40, 9, 14)]
    ref = _engine(tiny_ckpt, policy, compile=False, less=less)
    want, ref_slots = decode_schedule(ref, prompts, STEPS)
    e = _engine(tiny_ckpt, policy, compile=True, less=less)
    assert e.compiled is not None and e.compile_off is None and e.graphs is not None
    assert e.slab.num_slots == 5 and e.slab.free_slots == 4  # the pad slot is never handed out
    calls, compiled = [], e.compiled
    e.compiled = lambda *a, **kw: (calls.append(a[0].shape), compiled(*a, **kw))[1]
    got, slots = decode_schedule(e, prompts, STEPS)
    # every decode step's every layer went through the compiled step, at the bucket's shape
    # (plus one run per bucket when it was first prepared); prefill chunks did not
    assert len(calls) == (len(STEPS) + 2) * e.args.num_layers and {s[0] for s in calls} == {1, 4}
    assert all(s[2] == 1 for s in calls)
    assert e.graphs.pad_slot not in slots
    assert e.graphs.replays == len(STEPS) and sorted(e.graphs.graphs) == [1, 4] and not e.graphs.fallback
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(slots, ref_slots, strict=True):
        assert e.slab.seen[a] == ref.slab.seen[b]
        assert int(e.slab.length[a]) == int(ref.slab.length[b])
        n = int(e.slab.length[a])
        assert torch.equal(e.slab.pos[:, a, :, :n], ref.slab.pos[:, b, :, :n])  # the same tokens kept
        for f in STATE_FIELDS:
            x, y = getattr(e.slab, f)[:, a], getattr(ref.slab, f)[:, b]
            if x.dim() >= 3 and x.shape[2] == e.slab.capacity:  # per-row fields: only the live rows mean anything
                x, y = x[:, :, :n], y[:, :, :n]
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_warm_up_compiles_every_bucket_on_the_pad_slot_only(tiny_ckpt):
    e = _engine(tiny_ckpt, "h2o", compile=True)
    s = e.alloc()
    e.prefill(s, list(range(1, 21)))
    before = {f: getattr(e.slab, f)[:, s].clone() for f in STATE_FIELDS}
    assert e.warm_up() == {}
    assert sorted(e.graphs.graphs) == [1, 2, 4] and e.graphs.replays == 0
    for f, t in before.items():  # a live session is untouched by the warm-up
        assert torch.equal(getattr(e.slab, f)[:, s], t)
    assert e.slab.seen[s] == 20


def test_compile_is_refused_where_it_does_not_apply(tiny_ckpt):
    e = _engine(tiny_ckpt, "full", compile=True)
    assert e.compiled is None and "full policy" in e.compile_off
    assert e.graphs is None and e.slab.free_slots == 4  # no pad slot, no buckets: the plain eager step
    assert e.warm_up() == {}
    fn, why = compiled_attend(True, "triton", e.spec, 3)  # the Triton kernels are already fused
    assert fn is None and "torch kernels" in why


def test_compile_off_by_default(tiny_ckpt):
    e = _engine(tiny_ckpt, "h2o", compile=False)
    assert e.compiled is None and e.compile_off == "compile is off" and e.graphs is None
