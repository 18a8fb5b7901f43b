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
    assert {"config", "turns_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s",
            "sessions_held"} <= set(COLUMNS)
