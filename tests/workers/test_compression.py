"""Policy names and eviction specs (workers/compression.py): parsing, the equal-memory budget of the
`+` baselines, the documented defaults (h2o recent = budget/2, lambda sink 4) and every refusal."""

from __future__ import annotations

import math

import pytest

from lessserve.workers.compression import POLICY_NAMES, Policy, eviction_spec, less_state_tokens
from lessserve.workers.errors import ConfigError


@pytest.mark.parametrize("name,base,less,plus", [
    ("full", "full", False, False), ("h2o", "h2o", False, False), ("lambda", "lambda", False, False),
    ("h2o+less", "h2o", True, False), ("lambda+less", "lambda", True, False), ("h2o+", "h2o", False, True),
    ("lambda+", "lambda", False, True), (" H2O+LESS ", "h2o", True, False)])
def test_parse_and_name_round_trip(name, base, less, plus):
    p = Policy.parse(name)
    assert (p.base, p.less, p.plus) == (base, less, plus)
    assert p.name == name.strip().lower() and Policy.parse(p.name) == p


@pytest.mark.parametrize("name", ["", "h2o+x", "h2o++", "lambda+less+", "snapkv", "full+less", "full+"])
def test_unknown_policies_are_refused_naming_the_choices(name):
    with pytest.raises(ConfigError, match="unknown policy") as ex:
        Policy.parse(name)
    assert all(n in str(ex.value) for n in POLICY_NAMES)


# (25, 1, 1) and (64, 2, 1): states many tokens long, where a byte more per token changes the count
@pytest.mark.parametrize("rank,D,itemsize", [(8, 64, 4), (8, 64, 2), (4, 16, 4), (8, 128, 2), (1, 1, 1), (25, 1, 1),
                                             (64, 2, 1)])
def test_less_state_tokens_is_the_state_bytes_in_tokens_rounded_up(rank, D, itemsize):
    got = less_state_tokens(rank, D, itemsize)
    state, token = rank * (D + 1) * 4, 2 * D * itemsize + 8
    assert got == math.ceil(state / token) and (got - 1) * token < state <= got * token


def test_a_plain_policy_by_default_and_immutable():
    import dataclasses

    assert Policy("h2o") == Policy.parse("h2o") and not Policy("lambda").less and not Policy("lambda").plus
    assert len({Policy.parse("h2o+less"), Policy.parse(" h2o+less")}) == 1  # hashable: usable as a key
    with pytest.raises(dataclasses.FrozenInstanceError):
        Policy("h2o").less = True


def test_documented_values():
    assert less_state_tokens(8, 64, 4) == 4 and less_state_tokens(8, 64, 2) == 8  # docs/engine.md: +4 / +8


def spec(name, budget=16, recent=None, sink=4, max_context=512, extra=0):
    s = eviction_spec(Policy.parse(name), budget, recent, sink, max_context, extra)
    return s.mode, s.budget, s.recent, s.sink


def test_specs():
    assert eviction_spec(Policy.parse("h2o+"), 16, None, 4, 512) == eviction_spec(Policy.parse("h2o"), 16, None, 4, 512)
    assert spec("full") == ("full", 512, 512, 0)
    assert spec("full", budget=1, extra=7) == ("full", 512, 512, 0)  # full ignores the budget
    assert spec("h2o") == ("h2o", 16, 8, 0) and spec("h2o", budget=17) == ("h2o", 17, 8, 0)
    assert spec("h2o", recent=3) == ("h2o", 16, 3, 0)
    assert spec("h2o+less", extra=5) == ("h2o", 16, 8, 0)  # +less keeps the budget: the state is extra
    assert spec("h2o+", extra=5) == ("h2o", 21, 10, 0)
    assert spec("h2o+", recent=3, extra=5) == ("h2o", 21, 5, 0)  # the window grows by half the extra
    assert spec("lambda") == ("lambda", 16, 12, 4) and spec("lambda", sink=1) == ("lambda", 16, 15, 1)
    assert spec("lambda+", extra=4) == ("lambda", 20, 16, 4)
    assert spec("h2o", budget=2) == ("h2o", 2, 1, 0) and spec("lambda", budget=2, sink=1) == ("lambda", 2, 1, 1)


@pytest.mark.parametrize("name,kw,match", [
    ("h2o", {"budget": 1}, "budget must be >= 2"), ("lambda", {"budget": 0}, "budget must be >= 2"),
    ("h2o", {"recent": 16}, "recent window"), ("h2o", {"recent": 0}, "recent window"),
    ("h2o", {"recent": 20}, "recent window"), ("lambda", {"sink": 16}, "sink"), ("lambda", {"sink": 0}, "sink"),
    ("lambda+", {"sink": 20, "extra": 3}, "sink")])
def test_invalid_specs_are_refused(name, kw, match):
    with pytest.raises(ConfigError, match=match):
        spec(name, **kw)
