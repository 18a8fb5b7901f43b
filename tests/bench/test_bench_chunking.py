"""`bench chunking`: perplexity per prefill chunk, and through the cache a chunk leaves (decode tail)."""

from __future__ import annotations

import math

import pytest
import torch

from lessserve.bench.chunking import run_chunking, window_nll
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine


def test_the_decoded_tail_scores_the_same_tokens_as_one_prefill(tiny_ckpt):
    """Under the full policy nothing is evicted, so predicting the last tokens one decode step at a
    time must give the same NLL as predicting them inside the prefill: the tail's indexing holds."""
    e = Engine(EngineConfig(model="tiny", policy="full", max_context=128, prefill_chunk=16, max_slots=1),
               checkpoint=tiny_ckpt)
    ids = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    whole, split = window_nll(e, ids), window_nll(e, ids, tail=11)
    assert whole["tokens"] == split["tokens"] == 69 and whole["tail_nll"] == 0.0
    assert split["tail_nll"] > 0
    assert split["nll"] == pytest.approx(whole["nll"], rel=1e-5)


def test_rows_per_policy_and_chunk_on_the_test_part(one_torch_thread):
    res = run_chunking(EngineConfig(budget=32), ["h2o"], 32, [8, 32], "../shared/data/tinyshakespeare.txt",
                       context=96, windows=1, threads=1, part="test", tail=16)
    assert res.meta["part"] == "test" and res.meta["decode_tail"] == 16
    by = {r["chunk"]: r for r in res.rows}
    assert set(by) == {8, 32} and all(r["tokens"] == 95 for r in by.values())
    assert by[8]["ppl_vs_chunk8_pct"] == 0 and by[8]["decode_ppl_vs_chunk8_pct"] == 0
    assert by[32]["decode_ppl_vs_chunk8_pct"] == pytest.approx(100 * (by[32]["decode_ppl"] / by[8]["decode_ppl"] - 1))
    assert all(math.isfinite(r["decode_ppl"]) and r["decode_ppl"] > 1 for r in by.values())
