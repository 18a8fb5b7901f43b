"""Shared fixtures: a tiny random Llama for fast engine math, the real default model for the rest."""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from lessserve.lab.engines import with_less_weights  # noqa: E402  (tests of +less at any budget)
from lessserve.testing.local_redis import LocalRedis  # noqa: E402
from lessserve.workers.model_loader import LoadedCheckpoint, ModelArgs  # noqa: E402

TINY = ModelArgs(arch="LlamaForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=4096, tie_word_embeddings=True, attention_bias=False)


def tiny_checkpoint(tmp_path, args: ModelArgs = TINY, seed: int = 0) -> LoadedCheckpoint:
    from lessserve.workers.model import LlamaModel

    torch.manual_seed(seed)
    m = LlamaModel(args)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    return LoadedCheckpoint(model_id="tiny", folder=tmp_path, args=args, state_dict=state)


@pytest.fixture
def tiny_ckpt(tmp_path):
    return tiny_checkpoint(tmp_path)


def tiny_less(args: ModelArgs = TINY, seed: int = 1, scale_init: float = 1.0):
    """Random LESS weights with visible effect (s1 = s2 = 1 instead of the paper's 1e-4)."""
    from lessserve.workers.less_weights import LessWeights

    return LessWeights.random(args.num_layers, args.num_heads, args.num_kv_heads, args.head_dim, rank=4,
                              hidden=8, seed=seed, scale_init=scale_init, model="tiny")


@pytest.fixture(scope="session")
def default_ckpt():
    from lessserve.workers.model_loader import load_checkpoint

    return load_checkpoint("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def default_engine_factory(default_ckpt):
    """Builds engines over the real default model, sharing one copy of the weights."""
    from lessserve.workers.config import EngineConfig
    from lessserve.workers.engine import Engine

    first: dict = {}

    def make(**cfg) -> Engine:
        c = with_less_weights(EngineConfig(**{"max_slots": 2, "max_context": 1024, **cfg}), default_ckpt.model_id)
        if not first:
            first["e"] = Engine(c, checkpoint=default_ckpt)
            return first["e"]
        e0 = first["e"]
        return Engine(c, checkpoint=default_ckpt, tokenizer=e0.tokenizer, model=e0.model)

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """The CI and dev machines have 2 shared cores: one intra-op thread avoids spin-wait collapse
    (measured 150x on a contended box). Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def redis_server():
    """One shared server for the session; tests isolate themselves with a unique key prefix."""
    server = LocalRedis().start()
    yield server
    server.stop()


@pytest.fixture
def own_redis():
    """A private server a fault test may kill and restart (AOF on, fsync always)."""
    server = LocalRedis().start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def default_model(default_ckpt):
    """(checkpoint, first engine) of the real default model, loaded once."""
    from lessserve.workers.config import EngineConfig
    from lessserve.workers.engine import Engine

    ckpt = default_ckpt
    first = Engine(EngineConfig(policy="h2o", budget=16, max_slots=2, prefill_chunk=16, device="cpu",
                                dtype="float32"), checkpoint=ckpt)
    return ckpt, first


@pytest.fixture
def default_engine(default_model):
    """make(**cfg): an engine over the real default model, sharing the loaded weights."""
    from lessserve.workers.config import EngineConfig
    from lessserve.workers.engine import Engine

    ckpt, first = default_model

    def make(**cfg):
        c = EngineConfig(**{"policy": "h2o", "budget": 16, "max_slots": 2, "prefill_chunk": 16, "device": "cpu",
                            "dtype": "float32", **cfg})
        c = with_less_weights(c, ckpt.model_id)
        return Engine(c, checkpoint=ckpt, tokenizer=first.tokenizer, model=first.model)

    return make


def pytest_collection_modifyitems(config, items):
    """Multinode tests start their own Ray cluster (several nodes) and need a process where Ray
    is not running yet: they run first."""
    items.sort(key=lambda item: item.get_closest_marker("multinode") is None)


@pytest.fixture
def tiny_engine_factory(tiny_ckpt):
    from lessserve.workers.config import EngineConfig
    from lessserve.workers.engine import Engine

    def make(**cfg):
        return Engine(EngineConfig(**{"policy": "h2o", "budget": 16, "max_slots": 6, "prefill_chunk": 8,
                                      "device": "cpu", "dtype": "float32", **cfg}), checkpoint=tiny_ckpt)

    return make
