"""Paired bootstrap intervals (lab/bootstrap.py: shared by the evaluations and the benches)."""

from __future__ import annotations

import math

import pytest

from lessserve.lab.bootstrap import ppl_ratio_ci


def test_ppl_ratio_of_a_variant_against_itself_is_zero_with_a_zero_interval():
    nll = [30.0, 41.0, 25.0, 38.0]
    ci = ppl_ratio_ci(nll, nll, [16] * 4)
    assert ci == {"value": 0.0, "low": 0.0, "high": 0.0}


def test_ppl_ratio_value_and_interval():
    ref = [30.0, 41.0, 25.0, 38.0, 33.0, 29.0]
    x = [v - 1.6 if i % 2 else v - 0.4 for i, v in enumerate(ref)]  # lower NLL on every unit, unevenly
    tokens = [16] * 6
    ci = ppl_ratio_ci(x, ref, tokens)
    want = 100 * (math.exp(sum(x) / 96) / math.exp(sum(ref) / 96) - 1)
    assert ci["value"] == pytest.approx(want)
    assert ci["low"] < ci["value"] < ci["high"] < 0  # every unit improved: the whole interval is below 0
    assert ci["low"] >= 100 * (math.exp(-1.6 / 16) - 1) - 1e-9  # no resample beats the best unit


def test_one_unit_has_no_interval():
    ci = ppl_ratio_ci([10.0], [11.0], [8])
    assert math.isnan(ci["low"]) and math.isnan(ci["high"]) and ci["value"] < 0
