"""int8 offload does not hurt perplexity: after every prefill chunk the session is packed with int8
keys and values and restored (the worst case: quantisation error compounds at each offload), and
the perplexity stays within 1% of the same run without offload. Default model with its shipped
LESS weights (h2o+less), budget 128, prefill chunk 64, 3 windows x 512 tokens of tinyshakespeare,
torch path. Each restore also gives back the positions, scores and the LESS state (H, z) bit for
bit, and the keys and values as their quantise / dequantise."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.workers.replay import assert_same_state, int8_round_trip

TEXT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tinyshakespeare.txt"


def _nll(engine, ids: list[int], quant: str | None) -> float:
    from lessserve.kernels import ops

    slab, slot = engine.slab, engine.alloc()
    try:
        logits = []
        for off, size in engine.chunks(0, len(ids)):
            logits.append(engine.prefill(slot, ids[off : off + size], all_logits=True))
            if quant:
                before = slab.export(slot)
                f = (slab.k, slab.v, slab.pos, slab.score, slab.H, slab.z, slab.length)
                rec = ops.pack_slots(*f, torch.tensor([slot], device=slab.k.device), quant)
                for t in f[:6]:
                    t[:, slot] = 0
                slab.length[slot] = 0
                ops.unpack_slot(rec[0], *f, slot, quant)
                assert_same_state(slab.export(slot), int8_round_trip(before), f"restore after {off + size} tokens")
                assert off + size <= engine.spec.budget or float(before["z"].abs().sum()) > 0  # H, z carry state
        lg = torch.cat(logits)[:-1].float()
        return float(F.cross_entropy(lg, torch.tensor(ids[1:], device=lg.device), reduction="sum"))
    finally:
        engine.free(slot)


@pytest.mark.slow
def test_int8_offload_every_chunk_keeps_ppl_within_1pct(default_engine_factory):
    if not TEXT.is_file():
        pytest.skip(f"tinyshakespeare not found at {TEXT} (../shared/data beside the checkout)")
    e = default_engine_factory(policy="h2o+less", kernels="torch", budget=128, prefill_chunk=64, max_slots=1)
    ids = e.tokenizer(TEXT.read_text()[:60_000], add_special_tokens=False)["input_ids"]
    windows = [ids[s : s + 512] for s in (2000, 6000, 10_000)]
    assert all(len(w) == 512 for w in windows)
    base = sum(_nll(e, w, None) for w in windows)
    q = sum(_nll(e, w, "int8") for w in windows)
    n = sum(len(w) - 1 for w in windows)
    ppl, ppl_q = math.exp(base / n), math.exp(q / n)
    print(f"ppl none {ppl:.4f}  int8-offload-every-chunk {ppl_q:.4f}  rel {(ppl_q / ppl - 1) * 100:+.3f}%")
    assert e.less is not None
    assert ppl_q != ppl and abs(ppl_q / ppl - 1) < 0.01
