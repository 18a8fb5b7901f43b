"""The engine generates the same greedy tokens with kernels="triton" (the interpreter on CPU) as with
kernels="torch": prefill chunks of 16, budget 32 so eviction happens in prefill and in decode.

The tiny random model runs in seconds, the default model (smollm2-135m-instruct, 30 layers) with h2o
in under a minute; with LESS it costs minutes under the interpreter on 2 cores, so it is marked long
(deselected by default: the tiny model's h2o+less parity and the oracle's Triton cases run instead).
Quantised slots (kv_bits 8 / 4) too: Triton attention over the codes, evict-and-absorb in torch."""

from __future__ import annotations

import pytest
import torch

from tests.workers.replay import scheduled

PROMPT = ("The history of the city begins in the early medieval period, when a small settlement grew "
          "around a river crossing. Over the following centuries merchants, monks and craftsmen settled "
          "there and built walls")


def _generate(cfg_kw: dict, ckpt, less, ids: list[int], tokenizer=None, model=None, n_new: int = 8) -> list[int]:
    from lessserve.workers.config import EngineConfig
    from lessserve.workers.engine import Engine

    e = Engine(EngineConfig(budget=32, prefill_chunk=16, max_slots=1, max_context=1024, **cfg_kw),
               checkpoint=ckpt, less=less, tokenizer=tokenizer, model=model)
    return scheduled(e, ids, n_new)


@pytest.mark.parametrize("kv_bits", ["native", "8", "4"])
@pytest.mark.parametrize("policy", ["h2o+less", "lambda"])
def test_tiny_model_same_tokens(tiny_ckpt, policy, kv_bits):
    from tests.conftest import tiny_less

    less = tiny_less() if "less" in policy else None
    ids = torch.randint(0, 128, (45,)).tolist()
    cfg = {"model": "tiny", "policy": policy, "dtype": "float32", "kv_bits": kv_bits}
    want = _generate({**cfg, "kernels": "torch"}, tiny_ckpt, less, ids)
    got = _generate({**cfg, "kernels": "triton"}, tiny_ckpt, less, ids)
    assert got == want


def test_quantised_slots_under_triton_evict_in_torch_and_say_so(tiny_ckpt, caplog):
    """kernels=triton with kv_bits 8 / 4: the attention kernel reads the codes; evict-and-absorb has no
    Triton kernel for quantised slots and runs the torch path, on record (not silently)."""
    import logging

    from lessserve.workers.config import EngineConfig
    from lessserve.workers.engine import Engine

    caplog.set_level(logging.INFO, logger="lessserve.workers.engine")
    for bits in ("8", "4"):
        e = Engine(EngineConfig(model="tiny", kernels="triton", kv_bits=bits, dtype="float32", max_slots=1),
                   checkpoint=tiny_ckpt)
        assert (e.impl, e.evict_impl) == ("triton", "torch")
        assert f"kv_bits {bits} with kernels=triton" in caplog.text and "evict-and-absorb runs the torch path" \
            in caplog.text
    native = Engine(EngineConfig(model="tiny", kernels="triton", dtype="float32", max_slots=1), checkpoint=tiny_ckpt)
    assert native.evict_impl == "triton"


def test_default_model_same_tokens_h2o(default_ckpt, default_engine_factory):
    """The CLI's default policy (h2o) on the default model: ~40 s under the interpreter."""
    base = default_engine_factory(kernels="torch", budget=32, prefill_chunk=16, max_slots=1)
    ids = base.tokenizer.encode(PROMPT)
    assert len(ids) > 32  # eviction already during prefill
    out = {k: _generate({"policy": "h2o", "kernels": k}, default_ckpt, None, ids, base.tokenizer, base.model)
           for k in ("torch", "triton")}
    assert out["triton"] == out["torch"]


@pytest.mark.long
def test_default_model_same_tokens_h2o_less(default_ckpt, default_engine_factory):
    """h2o+less with random LESS weights of visible strength (s1 = s2 = 1), 8 greedy tokens."""
    from lessserve.workers.less_weights import LessWeights

    base = default_engine_factory(kernels="torch", budget=32, prefill_chunk=16, max_slots=1)
    a = base.args
    less = LessWeights.random(a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim, rank=8, hidden=16, seed=0,
                              scale_init=1.0, model="random")
    ids = base.tokenizer.encode(PROMPT)
    assert len(ids) > 32  # eviction already during prefill
    out = {k: _generate({"policy": "h2o+less", "kernels": k}, default_ckpt, less, ids, base.tokenizer, base.model)
           for k in ("torch", "triton")}
    assert out["triton"] == out["torch"]
