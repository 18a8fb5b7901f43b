"""Typed errors instead of None or silent defaults."""

import pytest

from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.errors import (
    ConfigError,
    ContextOverflowError,
    LessWeightsMissingError,
    SlotsExhaustedError,
    SlotStateError,
)
from lessserve.workers.less_weights import LessWeights


def test_slots_exhausted_and_bad_slot(tiny_ckpt):
    e = Engine(EngineConfig(model="tiny", max_slots=2), checkpoint=tiny_ckpt)
    a, b = e.alloc(), e.alloc()
    with pytest.raises(SlotsExhaustedError):
        e.alloc()
    e.free(a)
    assert e.alloc() == a
    with pytest.raises(SlotStateError):
        e.free(99)
    e.free(b)
    with pytest.raises(SlotStateError):
        e.decode([b], [1])


def test_less_without_kernels_is_a_clear_error(tiny_ckpt):
    with pytest.raises(LessWeightsMissingError, match="train-less"):
        Engine(EngineConfig(model="tiny", policy="h2o+less"), checkpoint=tiny_ckpt)


def test_less_kernels_of_another_shape_refused(tiny_ckpt):
    other = LessWeights.random(3, 4, 2, 16)
    with pytest.raises(ConfigError, match="do not fit"):
        Engine(EngineConfig(model="tiny", policy="h2o+less"), checkpoint=tiny_ckpt, less=other)


def test_full_policy_overflow(tiny_ckpt):
    e = Engine(EngineConfig(model="tiny", policy="full", max_context=16, prefill_chunk=8), checkpoint=tiny_ckpt)
    s = e.alloc()
    e.prefill(s, list(range(16)))
    with pytest.raises(ContextOverflowError):
        e.decode([s], [1])


@pytest.mark.parametrize("bad", [{"policy": "nope"}, {"budget": 1}, {"prefill_chunk": 0}, {"kernels": "cuda"}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        EngineConfig(**bad)


def test_kernels_file_round_trip(tmp_path, tiny_ckpt):
    k = LessWeights.random(2, 4, 2, 16, rank=4, hidden=8, scale_init=1.0)
    k.save(tmp_path / "k.safetensors")
    back = LessWeights.load(tmp_path / "k.safetensors")
    assert back.manifest["rank"] == 4 and len(back.layers) == 2
    assert (back.layers[1].w1q - k.layers[1].w1q).abs().max() < 1e-2  # fp16 on disk
    with pytest.raises(ConfigError, match="missing"):
        LessWeights.load(tmp_path / "absent.safetensors")
