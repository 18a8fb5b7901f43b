"""The per-layer stage of `train-less`: capture Q/K/V once, then train and save each layer's LESS weights.

Work directory layout (resumable per layer):
  capture-<key>/layer{i}-g{j}.pt  q, k, v of the frozen model on training sequences j.. j+7 (key = model,
                              data, seq_len, num_seqs, seed; shared by every policy and budget)
  <run>/layer{i}.pt           a finished layer: weights + losses (a resumed run skips these)
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import torch

from lessserve.kernels.reference.lowrank import LessLayerWeights
from lessserve.lab.output import progress_bar
from lessserve.training.capture import (
    capture_qkv,
    capture_qkv_compressed,
    eviction_chunks,
    load_layer,
    save_layer,
)
from lessserve.training.config import TrainConfig
from lessserve.training.data import split_train_val
from lessserve.training.layer import prepare_layer, train_layer
from lessserve.workers.compression import Policy, eviction_spec
from lessserve.workers.less_weights import FIELDS, LessWeights
from lessserve.workers.model import LlamaModel


def capture_key(cfg: TrainConfig, seqs: torch.Tensor) -> str:
    src = cfg.qkv_source if cfg.qkv_source == "full" else f"{cfg.qkv_source}|{cfg.policy}|{cfg.budget}|{cfg.chunk}"
    h = hashlib.sha256(f"{cfg.model}|{cfg.data_sha256}|{tuple(seqs.shape)}|{cfg.seed}|{src}".encode())
    h.update(seqs.numpy().tobytes())
    return h.hexdigest()[:12]


def policy_spec(cfg: TrainConfig):
    return eviction_spec(Policy.parse(cfg.policy), cfg.budget, cfg.recent, cfg.sink, max_context=1 << 30)


CAPTURE_GROUP = 8  # sequences per capture file: memory holds one group of all layers, not the whole set


def _group_path(cdir: Path, layer: int, g: int) -> Path:
    return cdir / f"layer{layer}-g{g}.pt"


def ensure_capture(model: LlamaModel, seqs: torch.Tensor, cdir: Path, cfg: TrainConfig) -> None:
    """Capture every layer's q/k/v in groups of CAPTURE_GROUP sequences (resumable per group)."""
    L = model.args.num_layers
    groups = range(0, len(seqs), CAPTURE_GROUP)
    todo = [g for g in groups if not all(_group_path(cdir, i, g).is_file() for i in range(L))]
    if not todo:
        return
    cdir.mkdir(parents=True, exist_ok=True)
    with progress_bar(total=len(seqs), initial=len(seqs) - sum(len(seqs[g:g + CAPTURE_GROUP]) for g in todo),
                      desc=f"capture q/k/v ({cfg.qkv_source})", unit="seq") as bar:
        for g in todo:
            part = seqs[g:g + CAPTURE_GROUP]
            if cfg.qkv_source == "compressed":
                layers = capture_qkv_compressed(model, part, policy_spec(cfg), cfg.chunk, progress=bar.update)
            else:
                layers = capture_qkv(model, part, progress=bar.update)
            for i, t in enumerate(layers):
                save_layer(_group_path(cdir, i, g), t)


def load_captured(cdir: Path, layer: int, n: int) -> dict[str, torch.Tensor]:
    parts = [load_layer(_group_path(cdir, layer, g)) for g in range(0, n, CAPTURE_GROUP)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def train_one(i: int, cdir: Path, model: LlamaModel, cfg: TrainConfig, split, device, bar_pos: int) -> dict:
    spec = policy_spec(cfg)
    t = {k: v.to(device) for k, v in load_captured(cdir, i, len(split[0]) + len(split[1])).items()}
    e = eviction_chunks(t["q"], t["k"], t["v"], spec, cfg.chunk)
    tr_idx, va_idx = split
    start = (cfg.budget // cfg.chunk) * cfg.chunk  # whole chunks of queries (less_output groups by chunk)
    n_chunks = -(-t["q"].shape[2] // cfg.chunk)
    pool = torch.arange(start // cfg.chunk, n_chunks)
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + i)
    pick = None
    if 0 < cfg.query_chunks < len(pool):
        pick = pool[torch.randperm(len(pool), generator=gen)[: cfg.query_chunks]].sort().values
    train = prepare_layer(t["q"][tr_idx], t["k"][tr_idx], t["v"][tr_idx], e[tr_idx], cfg.chunk, start, chunks=pick)
    val = prepare_layer(t["q"][va_idx], t["k"][va_idx], t["v"][va_idx], e[va_idx], cfg.chunk, start, chunks=pick)
    del t
    o_proj = model.model.layers[i].self_attn.o_proj.weight.detach().float().to(device)
    steps = cfg.epochs * -(-len(tr_idx) // cfg.batch)
    with progress_bar(total=steps, desc=f"layer {i}", unit="step", leave=False, position=bar_pos) as bar:
        r = train_layer(train, val, o_proj, cfg.rank, cfg.hidden, cfg.epochs, seed=cfg.seed * 100003 + i, lr=cfg.lr,
                        batch=cfg.batch, dropout=cfg.dropout, step_every=max(1, cfg.epochs // 2), on_step=bar.update)
    return {"weights": {f: getattr(r.weights, f).cpu() for f in FIELDS},
            "stats": {"layer": i, "val_loss": r.val_loss, "sparse_val_loss": r.sparse_val_loss,
                      "train_loss": r.train_loss, "best_epoch": r.best_epoch,
                      "evicted_fraction": float((e < -(-e.shape[-1] // cfg.chunk)).float().mean())}}


def run_training(model: LlamaModel, seqs: torch.Tensor, cfg: TrainConfig, work_dir: Path, resume: bool = False,
                 device: torch.device | str = "cpu") -> LessWeights:
    """seqs [N, T] token ids (N >= 2) -> trained LessWeights (manifest filled in)."""
    if cfg.qkv_source not in ("full", "compressed"):
        raise ValueError(f"qkv_source must be full or compressed, got {cfg.qkv_source!r}")
    if cfg.policy not in ("h2o", "lambda"):
        raise ValueError(f"policy must be h2o or lambda, got {cfg.policy!r}")
    t0 = time.time()
    device = torch.device(device)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cdir = work_dir / f"capture-{capture_key(cfg, seqs)}"
    ensure_capture(model, seqs, cdir, cfg)
    rdir = work_dir / cfg.run_name()
    if rdir.exists() and not resume:
        shutil.rmtree(rdir)
    rdir.mkdir(parents=True, exist_ok=True)
    split = split_train_val(len(seqs), cfg.seed)
    L = model.args.num_layers
    stats = []
    layers = []
    with progress_bar(total=L, desc=f"LESS {cfg.policy} b{cfg.budget}", unit="layer") as outer:
        for i in range(L):
            path = rdir / f"layer{i}.pt"
            if path.is_file():
                done = torch.load(path, map_location="cpu", weights_only=True)
            else:
                done = train_one(i, cdir, model, cfg, split, device, bar_pos=1)
                tmp = path.with_suffix(".tmp")
                torch.save(done, tmp)
                tmp.rename(path)
            layers.append(LessLayerWeights(**done["weights"]))
            stats.append(done["stats"])
            outer.set_postfix(val=f"{done['stats']['val_loss']:.3g}", sparse=f"{done['stats']['sparse_val_loss']:.3g}")
            outer.update(1)
    a = model.args
    manifest = {
        "model": cfg.model, "policy": cfg.policy, "budget": cfg.budget, "rank": cfg.rank, "hidden": cfg.hidden,
        "num_layers": L, "num_heads": a.num_heads, "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim,
        "epochs": cfg.epochs, "seed": cfg.seed, "chunk": cfg.chunk, "recent": cfg.recent, "sink": cfg.sink,
        "lr": cfg.lr, "batch": cfg.batch, "query_chunks": cfg.query_chunks, "dropout": cfg.dropout,
        "seq_len": int(seqs.shape[1]),
        "num_seqs": int(seqs.shape[0]), "train_seqs": len(split[0]), "val_seqs": len(split[1]),
        "qkv_source": cfg.qkv_source, "masks": "replay of the engine's chunked eviction",
        "command": cfg.command, "data_sha256": cfg.data_sha256, "train_seconds": round(time.time() - t0, 1),
        "layers": stats, **cfg.extra,
    }
    return LessWeights(layers, manifest)
