"""The cuda_graphs switch: decode through per-bucket captured steps == the graph-free path.

On CPU no CUDA graph can be captured, so the switch falls back (and says why); the plumbing -
buckets, padding rows pointed at the reserved pad slot, static buffers filled per step - is run
with `EagerReplay`, a backend that replays the captured step eagerly on the same buffers.
"""

from __future__ import annotations

import pytest
import torch

from lessserve.workers.config import EngineConfig
from lessserve.workers.cuda_graphs import EagerReplay, buckets
from lessserve.workers.engine import Engine
from lessserve.workers.slots import STATE_FIELDS
from tests.workers.replay import decode_schedule


def _engine(ckpt, less, graphs: bool) -> Engine:
    cfg = EngineConfig(model="tiny", policy="h2o+less" if less else "h2o", budget=16, prefill_chunk=8, max_slots=5,
                       max_context=512, kernels="torch", dtype="float32", device="cpu", cuda_graphs=graphs)
    return Engine(cfg, checkpoint=ckpt, less=less)


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(5) == [1, 2, 4, 5]


def test_switch_falls_back_on_cpu(tiny_ckpt):
    e = _engine(tiny_ckpt, None, graphs=True)
    assert e.graphs is None and "no CUDA graphs on cpu" in e.graphs_off
    assert e.slab.num_slots == 5 and e.slab.free_slots == 5  # no pad slot without graphs


STEPS = [[0, 1, 2], [1], [0, 1], [0, 1, 2, 3, 4], [2, 4], [3], [0, 1, 2]]  # buckets 4, 1, 2, 5, 2, 1, 4


@pytest.fixture
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in (20, 9, 33, 3, 17)]


def test_graph_plumbing_matches_eager(tiny_ckpt, prompts, monkeypatch):
    from tests.conftest import tiny_less

    less = tiny_less()
    want, want_slots = decode_schedule(_engine(tiny_ckpt, less, graphs=False), prompts, STEPS)
    monkeypatch.setattr("lessserve.workers.engine.backend_for", lambda device: (EagerReplay(), None))
    e = _engine(tiny_ckpt, less, graphs=True)
    assert e.graphs is not None and e.slab.num_slots == 6 and e.slab.free_slots == 5
    pad = e.graphs.pad_slot
    got, got_slots = decode_schedule(e, prompts, STEPS)
    assert pad not in got_slots
    assert e.graphs.replays == len(STEPS) and sorted(e.graphs.graphs) == [1, 2, 4, 5] and not e.graphs.fallback
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    ref = _engine(tiny_ckpt, less, graphs=False)
    _, ref_slots = decode_schedule(ref, prompts, STEPS)
    for a, b in zip(got_slots, ref_slots, strict=True):  # every session's state, as without graphs
        assert e.slab.seen[a] == ref.slab.seen[b]
        assert int(e.slab.length[a]) == int(ref.slab.length[b])
        for f in STATE_FIELDS:
            torch.testing.assert_close(getattr(e.slab, f)[:, a], getattr(ref.slab, f)[:, b], atol=1e-5, rtol=1e-5)


class _Refuses:
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_capture_failure_runs_eagerly(tiny_ckpt, prompts, monkeypatch):
    want, _ = decode_schedule(_engine(tiny_ckpt, None, graphs=False), prompts, STEPS[:3])
    monkeypatch.setattr("lessserve.workers.engine.backend_for", lambda device: (_Refuses(), None))
    e = _engine(tiny_ckpt, None, graphs=True)
    got, _ = decode_schedule(e, prompts, STEPS[:3])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert e.graphs.replays == 0 and set(e.graphs.fallback) == {4, 1, 2}
    assert "stream is capturing" in e.graphs.fallback[4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_native(tiny_ckpt, prompts):
    """On a GPU: real capture with the Triton kernels, same logits as eager, every bucket replayed."""
    from tests.conftest import tiny_less

    less = tiny_less()

    def engine(graphs: bool) -> Engine:
        cfg = EngineConfig(model="tiny", policy="h2o+less", budget=16, prefill_chunk=8, max_slots=5,
                           max_context=512, kernels="triton", dtype="float32", device="cuda", cuda_graphs=graphs)
        return Engine(cfg, checkpoint=tiny_ckpt, less=less)

    want, _ = decode_schedule(engine(False), prompts, STEPS)
    e = engine(True)
    got, _ = decode_schedule(e, prompts, STEPS)
    assert not e.graphs.fallback, e.graphs.fallback
    assert e.graphs.replays == len(STEPS)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
