"""int8 offload does not hurt perplexity: every prefill chunk, the session is packed with int8 keys
and values and restored (the worst case: quantisation error compounds at each offload), and the
perplexity stays within 1% of the same run without offload. Default model, torch path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TEXT = Path("/work/shared/data/tinyshakespeare.txt")


def _nll(engine, ids: list[int], quant: str | None) -> float:
    from lessserve.kernels import ops

    slab, slot = engine.slab, engine.alloc()
    try:
        logits = []
        for off, size in engine.chunks(0, len(ids)):
            logits.append(engine.prefill(slot, ids[off : off + size], all_logits=True))
            if quant:
                f = (slab.k, slab.v, slab.pos, slab.score, slab.H, slab.z, slab.length)
                rec = ops.pack_slots(*f, torch.tensor([slot], device=slab.k.device), quant)
                for t in f[:6]:
                    t[:, slot] = 0
                ops.unpack_slot(rec[0], *f, slot, quant)
        lg = torch.cat(logits)[:-1].float()
        return float(F.cross_entropy(lg, torch.tensor(ids[1:], device=lg.device), reduction="sum"))
    finally:
        engine.free(slot)


@pytest.mark.slow
@pytest.mark.skipif(not TEXT.is_file(), reason="tinyshakespeare text not present")
def test_int8_offload_every_chunk_keeps_ppl_within_1pct(default_engine_factory):
    e = default_engine_factory(kernels="torch", budget=64, prefill_chunk=64, max_slots=1)
    ids = e.tokenizer(TEXT.read_text()[:40_000], add_special_tokens=False)["input_ids"]
    windows = [ids[6000:6256]]  # docs/kernels.md: 3 x 512 tokens, budget 128
    base = sum(_nll(e, w, None) for w in windows)
    q = sum(_nll(e, w, "int8") for w in windows)
    n = sum(len(w) - 1 for w in windows)
    ppl, ppl_q = math.exp(base / n), math.exp(q / n)
    print(f"ppl none {ppl:.4f}  int8-offload-every-chunk {ppl_q:.4f}  rel {(ppl_q / ppl - 1) * 100:+.3f}%")
    assert abs(ppl_q / ppl - 1) < 0.01
