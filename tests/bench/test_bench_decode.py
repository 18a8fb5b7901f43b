"""`bench decode`: a tiny run of the real program (default model, transformers + SDPA beside it)."""

from __future__ import annotations


def test_decode_rows_side_by_side_with_the_compiled_engine(one_torch_thread):
    """Per batch: this engine, transformers' full cache and the compile switch's engine, with the
    contract columns; the compiled row says its warm-up compiled every bucket (none eager) and
    gives its speed-up over the eager engine from paired rounds."""
    from lessserve.bench.decode import run_decode
    from lessserve.workers.config import EngineConfig

    res = run_decode(EngineConfig(policy="h2o", budget=32), batches=[2], context=96, steps=2, threads=1, compile=True)
    by = {r["system"]: r for r in res.rows}
    assert set(by) == {"lessserve h2o", "transformers full (sdpa)", "lessserve h2o + torch.compile"}
    ours, ref, comp = by["lessserve h2o"], by["transformers full (sdpa)"], by["lessserve h2o + torch.compile"]
    assert all(r["batch"] == 2 and r["tokens_per_s"] > 0 for r in by.values())
    assert ours["speedup_vs_transformers"] == ours["tokens_per_s"] / ref["tokens_per_s"]
    lo, hi = comp["speedup_vs_eager_range"]  # the median of the paired rounds' ratios, inside their range
    assert 0 < lo <= comp["speedup_vs_eager"] <= hi
    assert comp["compile_s"] > 0 and comp["eager_buckets"] == []
    assert ours["dtype"] == ref["dtype"] == "float32"  # the baseline runs in the engine's dtype
    assert ref["cache_bytes_per_session"] > ours["cache_bytes_per_session"]  # 96 tokens in full vs 32 kept


def test_decode_at_equal_bytes_times_quantised_slots_beside_the_native_one(one_torch_thread):
    """--equal-bytes 8,4: one more row per bits, the largest budget whose slot fits the native slot's
    bytes (more tokens per byte), timed in turn with the native engine."""
    from lessserve.bench.decode import run_decode
    from lessserve.workers.config import EngineConfig

    res = run_decode(EngineConfig(policy="h2o", budget=16), batches=[2], context=96, steps=2, threads=1,
                     equal_bytes=["8", "4"])
    by = {r["system"]: r for r in res.rows}
    assert set(by) == {"lessserve h2o", "transformers full (sdpa)", "lessserve h2o 8-bit", "lessserve h2o 4-bit"}
    native = by["lessserve h2o"]
    assert native["kv_bits"] == "native" and native["budget"] == 16
    for bits in ("8", "4"):
        q = by[f"lessserve h2o {bits}-bit"]
        assert q["kv_bits"] == bits and q["native_budget"] == 16
        assert q["native_bytes"] == native["cache_bytes_per_session"]
        assert q["cache_bytes_per_session"] <= native["cache_bytes_per_session"] and q["budget"] > 2 * 16
        lo, hi = q["speedup_vs_native_same_bytes_range"]
        assert 0 < lo <= q["speedup_vs_native_same_bytes"] <= hi and q["tokens_per_s"] > 0
    assert by["lessserve h2o 4-bit"]["budget"] > by["lessserve h2o 8-bit"]["budget"]


def test_equal_bytes_flag_is_checked(capsys):
    import pytest

    from lessserve.cli.main import main

    with pytest.raises(SystemExit) as ex:
        main(["bench", "decode", "--equal-bytes", "3"])
    assert ex.value.code == 2 and "--equal-bytes" in capsys.readouterr().err
