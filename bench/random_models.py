"""Engines on random weights of real model shapes (Llama-2-7B, Llama-3-8B, the default model): what a
GPU run benchmarks when no checkpoint can be carried to the machine. Timing depends on the shapes
only; the tokens are meaningless."""

from __future__ import annotations

from pathlib import Path

import torch

from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine, pick_device
from lessserve.workers.less_weights import LessWeights
from lessserve.workers.model import LlamaModel
from lessserve.workers.model_loader import LoadedCheckpoint, ModelArgs

# name -> (vocab, hidden, intermediate, layers, q heads, kv heads, head_dim, rope theta)
SHAPES = {
    "llama2-7b": (32000, 4096, 11008, 32, 32, 32, 128, 10000.0),
    "llama3-8b": (128256, 4096, 14336, 32, 32, 8, 128, 500000.0),
    "smollm2-135m": (49152, 576, 1536, 30, 9, 3, 64, 100000.0),
}


def model_args(name: str) -> ModelArgs:
    V, hid, inter, L, Hq, Hkv, D, theta = SHAPES[name]
    return ModelArgs(arch="LlamaForCausalLM", vocab_size=V, hidden_size=hid, intermediate_size=inter, num_layers=L,
                     num_heads=Hq, num_kv_heads=Hkv, head_dim=D, rms_norm_eps=1e-5, rope_theta=theta,
                     max_position_embeddings=131072, tie_word_embeddings=False, attention_bias=False)


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaModel:
    """Built on the meta device, materialised on `device`, filled in place (no host copy of 7B weights)."""
    with torch.device("meta"):
        m = LlamaModel(args).to(dtype)
    m.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return m.eval()


def random_engine(name: str, cfg: EngineConfig, model: LlamaModel | None = None) -> Engine:
    """An engine over random weights of `name`'s shape (random LESS weights for a `+less` policy)."""
    args = model_args(name)
    ckpt = LoadedCheckpoint(model_id=f"random-{name}", folder=Path("/nonexistent"), args=args, state_dict={})
    less = None
    if "+less" in cfg.policy:
        less = LessWeights.random(args.num_layers, args.num_heads, args.num_kv_heads, args.head_dim, rank=8,
                                  hidden=16, seed=0, model=ckpt.model_id, budget=cfg.budget)
    if model is None:
        device = pick_device(cfg.device)
        auto = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = random_model(args, device, auto if cfg.dtype == "auto" else getattr(torch, cfg.dtype))
    return Engine(cfg, checkpoint=ckpt, less=less, model=model)
