"""`bench serve`'s workload and JSON contract (no model: the bench itself is a program, not a test)."""

from __future__ import annotations

from lessserve.bench.serve import COLUMNS, Workload


def test_workload_is_bounded_seeded_and_mixes_reply_lengths():
    w = Workload(users=5, turns=6, first_words=100, words_median=10, short_tokens=3, long_tokens=9, seed=7)
    scripts, starts = w.scripts()
    assert (scripts, starts) == w.scripts()  # the same load for every configuration
    assert len(scripts) == 5 and all(len(s) == 6 for s in scripts)
    assert starts == sorted(starts) and starts[0] > 0
    assert {r for s in scripts for _, r in s} == {3, 9}
    assert all(len(s[0][0].split()) > len(s[1][0].split()) for s in scripts)  # the first message is the long one


def test_serve_rows_carry_the_contract_columns():
    assert {"config", "turns_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s",
            "sessions_held", "sessions_held_max", "kv_bytes", "recomputes", "evictions",
            "refused_turns"} <= set(COLUMNS)


def test_the_configurations_run_one_load_with_the_sessions_memory_bounded(one_torch_thread):
    """A tiny run of the real program (default model): every configuration finishes the same turns
    (the paged cache of the sessions' device bytes refuses them: too long for it), the rows carry the
    contract, and the sessions configuration holds no more KV memory than the full-policy slots it
    is compared with."""
    import torch

    from lessserve.bench.serve import run_serve

    load = Workload(users=2, turns=2, first_words=40, words_median=8, short_tokens=2, long_tokens=4, rate=20.0)
    before = torch.get_num_threads()
    try:
        res = run_serve("h2o", 32, load, slots=1, time_limit_s=120, chunk=64, max_context=512, threads=1,
                        session_slots=1)
    finally:
        torch.set_num_threads(before)
    by = {r["config"]: r for r in res.rows}
    assert set(by) == {"sessions", "recompute", "paged", "paged_large"}
    s, rc, pg, pl = by["sessions"], by["recompute"], by["paged"], by["paged_large"]
    assert all(r["turns"] == 4 and r["abandoned_turns"] == 0 for r in (s, rc, pl))
    assert s["kv_bytes"] <= rc["kv_bytes"]
    assert s["restores"] >= 1 and s["sessions_held"] == 2  # 2 users, 1 slot: the host tier held one
    assert rc["sessions_held"] == 0 and rc["prefill_tokens"] > s["prefill_tokens"]  # histories re-prefilled
    assert s["turns_per_s_ratio_vs_recompute"] == s["turns_per_s"] / rc["turns_per_s"]
    # the paged pools: whole 16-token blocks within their budgets (the sessions' device slots; the full slot)
    assert pg["kv_bytes"] <= pg["kv_budget_bytes"] == s["kv_bytes"] * 1 // 3  # 1 device slot of 3 (1 + 2 host)
    assert pl["kv_bytes"] <= pl["kv_budget_bytes"] == rc["kv_bytes"]
    assert pg["kv_dtype"] == pl["kv_dtype"] == "float32"  # the model's dtype (fp32 on the CPU)
    assert pg["turns"] == 0 and pg["refused_turns"] == 2  # a first turn alone needs more than 2 blocks
    assert pl["sessions_held"] == pl["sessions_held_max"] == 2 and pl["recomputes"] == 0
    assert pl["prefill_tokens"] < rc["prefill_tokens"]


def test_the_sessions_configuration_serves_quantised_slots(one_torch_thread):
    """--kv-bits 8: the sessions configuration's slots hold 8-bit codes (fewer bytes at the same budget)
    and every turn finishes, through the host tier and back."""
    from lessserve.bench.serve import run_serve

    load = Workload(users=2, turns=2, first_words=40, words_median=8, short_tokens=2, long_tokens=4, rate=20.0)
    rows = {}
    for bits in ("native", "8"):
        res = run_serve("h2o", 32, load, slots=1, time_limit_s=120, chunk=64, max_context=512, threads=1,
                        session_slots=1, configs=("sessions",), kv_bits=bits)
        rows[bits] = res.rows[0]
    q, n = rows["8"], rows["native"]
    assert q["kv_bits"] == "8" and n["kv_bits"] == "native" and q["budget"] == n["budget"] == 32
    assert q["turns"] == 4 and q["abandoned_turns"] == 0 and q["restores"] >= 1
    assert q["kv_bytes_per_session"] < n["kv_bytes_per_session"] / 2


def test_the_fp8_paged_configuration_holds_4x_the_blocks_at_the_paged_budget(one_torch_thread):
    """paged_fp8: the `paged` byte budget (the sessions configuration's device slot) in fp8 blocks:
    4x the fp32 blocks, so the turns the fp32 pool refuses (above: 2 blocks) are served."""
    from lessserve.bench.serve import DEFAULT_CONFIGS, run_serve

    assert "paged_fp8" not in DEFAULT_CONFIGS and "paged_large_fp8" not in DEFAULT_CONFIGS
    load = Workload(users=2, turns=2, first_words=40, words_median=8, short_tokens=2, long_tokens=4, rate=20.0)
    res = run_serve("h2o", 32, load, slots=1, time_limit_s=120, chunk=64, max_context=512, threads=1,
                    session_slots=1, configs=("sessions", "paged_fp8"))
    by = {r["config"]: r for r in res.rows}
    assert set(by) == {"sessions", "paged_fp8"}
    s, f8 = by["sessions"], by["paged_fp8"]
    assert f8["kv_dtype"] == "float8_e4m3fn" and "float8_e4m3fn" in f8["policy"]
    per_block = f8["kv_bytes"] // f8["kv_blocks"]
    assert per_block == 737_280 // 4  # the default model's fp32 block, 1 byte an element instead of 4
    assert f8["kv_budget_bytes"] == s["kv_bytes"] // 3  # the paged budget: 1 device slot of 3 (1 + 2 host)
    assert f8["kv_blocks"] == f8["kv_budget_bytes"] // per_block > f8["kv_budget_bytes"] // (4 * per_block)
    assert f8["turns"] == 4 and f8["refused_turns"] == f8["abandoned_turns"] == 0


def test_a_sessions_configuration_larger_than_the_baselines_memory_is_refused():
    import pytest

    from lessserve.bench.serve import run_serve
    from lessserve.errors.tree import ConfigError

    load = Workload(users=64, turns=1, first_words=5)
    with pytest.raises(ConfigError, match="--session-slots"):
        run_serve("h2o", 128, load, slots=1, time_limit_s=1, chunk=64, max_context=64, threads=1, session_slots=32)
