"""One LESS-weights training run (`lessserve train-less`): read the data, load the frozen model,
run the per-layer stage (or start from `init`), then the end-to-end stage, and save the weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from lessserve.errors import ConfigError
from lessserve.training.config import TrainLessConfig
from lessserve.training.data import TrainingDataError, read_training_text, token_blocks
from lessserve.training.e2e import run_finetune
from lessserve.training.layerwise import policy_spec, run_training
from lessserve.workers.engine import pick_device
from lessserve.workers.less_weights import SHIPPED_DIR, LessWeights
from lessserve.workers.model import LlamaModel
from lessserve.workers.model_loader import cache_root, load_checkpoint, load_tokenizer


class InitWeightsError(ConfigError):
    """The weights to start from (`init`) are for another model or policy."""


def train_less(cfg: TrainLessConfig, command: str) -> Path:
    """Train, save and return the path of the weights file. `command` is recorded in the manifest."""
    torch.set_num_threads(cfg.threads)
    text, sha = read_training_text(cfg.data, cfg.holdout)
    ckpt = load_checkpoint(cfg.model)
    tok = load_tokenizer(ckpt.folder)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seqs = token_blocks(ids, cfg.seq_len, cfg.num_seqs, cfg.seed)
    if len(seqs) < 2:
        raise TrainingDataError(f"need at least 2 sequences of --seq-len {cfg.seq_len} tokens, got {len(seqs)}")
    model = LlamaModel(ckpt.args)
    model.load_hf_state_dict(ckpt.state_dict)
    model.float().eval()
    layer_cfg = cfg.layerwise(ckpt.model_id, sha, command,
                              {"data": [os.path.relpath(d) for d in cfg.data], "holdout": cfg.holdout})
    work = Path(cfg.work_dir) if cfg.work_dir else cache_root() / "train-less"
    device = pick_device(cfg.device)
    if cfg.init:
        weights = LessWeights.load(cfg.init)
        got = (weights.manifest.get("model"), weights.manifest.get("policy"))
        if got != (ckpt.model_id, cfg.policy):
            raise InitWeightsError(f"weights are for {got[0]}/{got[1]}, not {ckpt.model_id}/{cfg.policy}")
    else:
        weights = run_training(model, seqs, layer_cfg, work, resume=cfg.resume, device=device)
    if cfg.finetune_steps:
        ft_seqs = token_blocks(ids, cfg.seq_len, cfg.finetune_seqs, cfg.seed + 1)
        weights = run_finetune(model, weights, ft_seqs, policy_spec(layer_cfg), cfg.chunk, cfg.finetune(), work,
                               command, resume=cfg.resume, device=device)
    out = Path(cfg.out) if cfg.out else SHIPPED_DIR / f"{ckpt.model_id}-{cfg.policy}-b{cfg.budget}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    weights.save(out)
    for s in weights.manifest["layers"]:
        print(f"layer {s['layer']:2d}: val {s['val_loss']:.4g}  sparse-only {s['sparse_val_loss']:.4g}  "
              f"(best epoch {s['best_epoch']})", file=sys.stderr)
    return out
