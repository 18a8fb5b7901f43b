"""`lessserve eval ppl --equal-bytes N`: each policy at the largest budget whose session slot fits N bytes
in the engine's kv_bits and dtype (slot bytes counted on the meta device, equal to a real slab's)."""

from __future__ import annotations

import pytest

from lessserve.cli.main import main
from lessserve.lab.equal_bytes import default_equal_bytes, equal_bytes_budget, slot_bytes_at
from tests.conftest import tiny_less


@pytest.mark.parametrize("policy,bits", [("h2o", "native"), ("h2o", "8"), ("h2o", "4"), ("lambda", "4"),
                                         ("h2o+less", "native"), ("h2o+less", "4"), ("h2o+", "8")])
def test_the_budget_is_the_largest_that_fits(tiny_engine_factory, tiny_ckpt, policy, bits):
    from lessserve.workers.config import EngineConfig
    from lessserve.workers.engine import Engine

    def make(budget, kv_bits=bits):
        cfg = EngineConfig(policy=policy, budget=budget, max_slots=1, device="cpu", dtype="float32", kv_bits=kv_bits)
        return Engine(cfg, checkpoint=tiny_ckpt, less=tiny_less() if "less" in policy else None)

    probe = make(16)
    n = default_equal_bytes(probe)  # an h2o slot at budget 128, fp32, native
    assert n == slot_bytes_at(probe, 128, "native", 0)
    b = equal_bytes_budget(probe, n)
    assert make(b).slab.slot_bytes() <= n < make(b + 1).slab.slot_bytes()
    if bits == "native" and policy == "h2o":
        assert b == 128 and make(128).slab.slot_bytes() == n
    if bits != "native":  # the tiny model's head_dim 16: 2.8x (8 bits) / 4.2x (4 bits) the tokens per byte
        assert b > equal_bytes_budget(make(16, "native"), n) * {"8": 2.5, "4": 3.5}[bits]


def test_too_few_bytes_is_an_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["eval", "ppl", "--text", __file__, "--equal-bytes", "-3"])
    assert ex.value.code == 2 and "--equal-bytes" in capsys.readouterr().err
