"""`bench recall`: bytes per history token (fp32 measured = computed; bf16 / int8 errors small but
not zero), TTFT rows with and without the recall round per history length and turn length, perplexity of +recall
beside its base policy on every test text; JSON and PNG written."""

from __future__ import annotations

import json
import math

import pytest

from lessserve.bench.recall import bench_recall, ppl_rows
from lessserve.lab.engines import EngineFactory
from lessserve.workers.config import EngineConfig


def test_rows_of_every_measure_and_files(tmp_path, one_torch_thread):
    factory = EngineFactory(EngineConfig(device="cpu", dtype="float32", max_context=2048))
    res = bench_recall(factory, "h2o", 128, lengths=(256, 512), repeats=1, context=256, windows=1, turn=64,
                       ppl_bases=("h2o",), prefixes=(0, 32))
    by = {m: [r for r in res.rows if r["measure"] == m] for m in ("bytes", "ttft", "ppl")}
    fp32, bf16, int8 = by["bytes"]
    assert fp32["bytes_per_token"] == fp32["bytes_per_token_measured"] == 30 * 3 * 64 * 2 * 4
    assert 0 < bf16["rel_error"] < 0.01 and 0 < int8["rel_error"] < 0.05
    assert int8["bytes_per_token"] < bf16["bytes_per_token"] < fp32["bytes_per_token"]
    short, long = sorted({r["turn_tokens"] for r in by["ttft"]})
    assert long == short + 32  # the question alone, and 32 tokens of text before it
    assert {(r["policy"], r["history"], r["turn_tokens"]) for r in by["ttft"]} == {
        (p, n, t) for p in ("h2o", "h2o+recall") for n in (256, 512) for t in (short, long)}
    assert all(r["ttft_ms"] > 0 and r.get("x_without", 1) > 0 for r in by["ttft"])
    assert {(r["policy"], r["text"]) for r in by["ppl"]} == {(p, t) for p in ("h2o", "h2o+recall")
                                                             for t in ("brown", "tinyshakespeare", "python_docs")}
    assert all(math.isfinite(r["ppl"]) and r["tokens"] == 255 for r in by["ppl"])
    res.write(tmp_path / "r.json", tmp_path / "r.png")
    assert len(json.loads((tmp_path / "r.json").read_text())) == len(res.rows)
    assert (tmp_path / "r.png").stat().st_size > 0


def test_perplexity_windows_come_from_the_part_asked_for(one_torch_thread):
    """Choices are made on the dev part (`--part dev`), reports on the test part: the rows say which."""
    factory = EngineFactory(EngineConfig(device="cpu", dtype="float32", max_context=512))
    dev, test = (ppl_rows(factory, ["h2o"], 128, 128, 1, 64, part=p) for p in ("dev", "test"))
    assert {r["part"] for r in dev} == {"dev"} and {r["part"] for r in test} == {"test"}
    assert [(r["policy"], r["text"]) for r in dev] == [(r["policy"], r["text"]) for r in test]
    assert all(a["ppl"] != b["ppl"] for a, b in zip(dev, test, strict=True))  # other windows, other text


def test_a_history_and_turn_past_the_models_limit_is_refused_naming_the_flags(one_torch_thread):
    factory = EngineFactory(EngineConfig(device="cpu", dtype="float32", max_context=1024, max_model_len=512))
    with pytest.raises(ValueError, match="--lengths or --ttft-prefix"):
        bench_recall(factory, "h2o", 128, lengths=(256, 480), repeats=1, ppl_bases=(), prefixes=(0, 64))
