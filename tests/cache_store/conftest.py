"""Fixtures for the cache store: a real redis-server on a free loopback port (owned and stopped
by PID), a tiny random engine whose slot states are encoded for tier tests, and the real default
model for conversations."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_ARGS = dict(arch="LlamaForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=4096, tie_word_embeddings=True, attention_bias=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from lessserve.workers.model import LlamaModel
    from lessserve.workers.model_loader import LoadedCheckpoint, ModelArgs

    args = ModelArgs(**TINY_ARGS)
    torch.manual_seed(0)
    m = LlamaModel(args)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    return LoadedCheckpoint(model_id="tiny", folder=tmp_path_factory.mktemp("tiny"), args=args, state_dict=state)


@pytest.fixture(scope="session")
def tiny_blobs(tiny_ckpt):
    """Encoded caches of tiny-engine slot states (random contents, several lengths), as the device
    tier writes them."""
    from lessserve.workers.config import EngineConfig
    from lessserve.workers.device_tier import EngineDeviceTier
    from lessserve.workers.engine import Engine

    tier = EngineDeviceTier(Engine(EngineConfig(policy="h2o", budget=16, max_slots=1, device="cpu", dtype="float32"),
                                   checkpoint=tiny_ckpt))
    slab, slot = tier.engine.slab, tier.new_slot("s")
    gen = torch.Generator().manual_seed(1)
    out = []
    for n in (3, 17, 40, 97, 5, 29):
        for f in ("k", "v", "score"):
            x = getattr(slab, f)[:, slot]
            x.copy_(torch.randn(x.shape, generator=gen).to(x.dtype))
        slab.pos[:, slot] = torch.randint(0, n, slab.pos[:, slot].shape, generator=gen, dtype=torch.int32)
        slab.length[slot], slab.seen[slot] = min(n, 16), n
        out.append(bytes(tier.get("s")))
    return out
