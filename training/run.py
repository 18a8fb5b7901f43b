"""One LESS-weights training run (`lessserve train-less`): read the train part of every file, load
the frozen model, run the per-layer stage (or start from `init`), then the end-to-end stage
validated on the dev parts, and save the weights. With `stream_tokens` the run is the streaming
per-layer stage alone (training/stream.py), for one or several policies (`train_stream_less`).
A stage never overwrites its input: the per-layer weights are saved apart (`stage1_out`), and
`out` may not be `init`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from lessserve.errors.tree import ConfigError
from lessserve.lab.corpus import SPLIT_RULE
from lessserve.training.config import TrainLessConfig
from lessserve.training.data import TrainingDataError, dev_blocks, mixture_blocks, read_corpus
from lessserve.training.e2e import run_finetune
from lessserve.training.layerwise import policy_spec, run_training
from lessserve.training.stream import train_stream
from lessserve.workers.compression import Policy, eviction_spec, less_state_tokens
from lessserve.workers.engine import pick_device
from lessserve.workers.less_weights import SHIPPED_DIR, LessWeights, model_fingerprint
from lessserve.workers.model import LlamaModel
from lessserve.workers.model_loader import cache_root, load_checkpoint, load_tokenizer


class InitWeightsError(ConfigError):
    """The weights to start from (`init`) are for another model or policy, or would be overwritten."""


def plus_spec(cfg: TrainLessConfig, rank: int, head_dim: int):
    """The equal-memory `+` baseline of the same policy and budget (fp32 cache, as on CPU)."""
    return eviction_spec(Policy.parse(cfg.policy + "+"), cfg.budget, cfg.recent, cfg.sink, max_context=1 << 30,
                         extra_tokens=less_state_tokens(rank, head_dim, 4))


def train_less(cfg: TrainLessConfig, command: str) -> Path:
    """Train, save and return the path of the weights file. `command` is recorded in the manifest."""
    torch.set_num_threads(cfg.threads)
    ckpt = load_checkpoint(cfg.model)
    out = Path(cfg.out) if cfg.out else SHIPPED_DIR / f"{ckpt.model_id}-{cfg.policy}-b{cfg.budget}.safetensors"
    if cfg.init and Path(cfg.init).resolve() == out.resolve():
        raise InitWeightsError(f"--out {out} is the --init file: a stage never overwrites its input")
    tok = load_tokenizer(ckpt.folder)
    train = read_corpus(cfg.data, "train", tok)
    seqs, share = mixture_blocks(train, cfg.seq_len, cfg.num_seqs, cfg.seed)
    if len(seqs) < 2:
        raise TrainingDataError(f"need at least 2 sequences of --seq-len {cfg.seq_len} tokens, got {len(seqs)}")
    model = LlamaModel(ckpt.args)
    model.load_hf_state_dict(ckpt.state_dict)
    model.float().eval()
    sources = {"data": train.paths, "texts": train.names, "sha256": train.sha256, "split_rule": SPLIT_RULE,
               "train_tokens_available": train.tokens()}
    layer_cfg = cfg.layerwise(ckpt.model_id, train.digest(), command, {"data_sources": sources})
    work = Path(cfg.work_dir) if cfg.work_dir else cache_root() / "train-less"
    device = pick_device(cfg.device)
    if cfg.init:
        weights = LessWeights.load(cfg.init)
        got = (weights.manifest.get("model"), weights.manifest.get("policy"))
        if got != (ckpt.model_id, cfg.policy):
            raise InitWeightsError(f"weights are for {got[0]}/{got[1]}, not {ckpt.model_id}/{cfg.policy}")
        stage1 = {"stage": "init", "file": os.path.relpath(cfg.init), "digest": weights.digest(),
                  "command": weights.manifest.get("command"), "budget": weights.manifest.get("budget"),
                  "tokens": weights.manifest.get("tokens")}
    else:
        weights = run_training(model, seqs, layer_cfg, work, resume=cfg.resume, device=device)
        s1 = Path(cfg.stage1_out) if cfg.stage1_out else work / layer_cfg.run_name() / "stage1.safetensors"
        s1.parent.mkdir(parents=True, exist_ok=True)
        weights.manifest["tokens"] = {"per_layer": int(seqs.numel())}
        weights.manifest["seqs_per_text"] = share
        weights.save(s1)
        weights = LessWeights.load(s1)  # what was saved (fp16), so the e2e stage starts from a file on disk
        stage1 = {"stage": "per-layer", "file": s1.name, "digest": weights.digest(), "command": command,
                  "seqs_per_text": share, "tokens": int(seqs.numel())}
        print(f"per-layer weights: {s1}", file=sys.stderr)
    weights.manifest["stages"] = [stage1]
    tokens = {"init": stage1["tokens"]} if cfg.init else {"per_layer": stage1["tokens"]}
    if cfg.finetune_steps:
        ft_seqs, ft_share = mixture_blocks(train, cfg.seq_len, cfg.finetune_seqs, cfg.seed + 1)
        dev = read_corpus(cfg.data, "dev", tok)
        val, val_names = dev_blocks(dev, cfg.seq_len, cfg.dev_seqs)
        weights = run_finetune(model, weights, ft_seqs, val, val_names, policy_spec(layer_cfg), cfg.chunk,
                               cfg.finetune(), work, command, resume=cfg.resume, device=device,
                               plus_spec=plus_spec(cfg, weights.rank, ckpt.args.head_dim))
        ft = weights.manifest["finetune"]
        ft["seqs_per_text"] = ft_share
        tokens["end_to_end"] = ft["tokens"]
        weights.manifest["stages"] = [stage1, {"stage": "end-to-end", "command": command, "init_digest":
                                               stage1["digest"], "tokens": ft["tokens"], "best_step": ft["best_step"]}]
        weights.manifest["dev"] = {k: v for k, v in ft["val_best"].items() if k not in ("train_kl", "lr")}
        weights.manifest["dev_tokens_per_text"] = dev.tokens()
    weights.manifest.update({"budget": cfg.budget, "command": command, "data_sources": sources,
                             "split_rule": SPLIT_RULE, "tokens": tokens,
                             "model_fingerprint": model_fingerprint(ckpt.args, ckpt.folder)})
    out.parent.mkdir(parents=True, exist_ok=True)
    weights.save(out)
    for s in weights.manifest.get("layers", []):
        best = f"best epoch {s['best_epoch']}" if "best_epoch" in s else f"best window {s.get('best_window')}"
        print(f"layer {s['layer']:2d}: val {s['val_loss']:.4g}  sparse-only {s['sparse_val_loss']:.4g}  ({best})",
              file=sys.stderr)
    return out


def stream_outputs(cfg: TrainLessConfig, model_id: str) -> dict[str, Path]:
    """Where each policy's weights go: --out as given for one policy, FILE-<policy>.safetensors for
    several; by default the shipped location of each."""
    pols = cfg.stream_policies()
    if not cfg.out:
        return {p: SHIPPED_DIR / f"{model_id}-{p}-b{cfg.budget}.safetensors" for p in pols}
    out = Path(cfg.out)
    return {p: out if len(pols) == 1 else out.with_name(f"{out.stem}-{p}{out.suffix or '.safetensors'}") for p in pols}


def train_stream_less(cfg: TrainLessConfig, command: str) -> list[Path]:
    """The streaming per-layer stage (`--stream-tokens`): train, save and return each policy's weights file."""
    torch.set_num_threads(cfg.threads)
    ckpt = load_checkpoint(cfg.model)
    outs = stream_outputs(cfg, ckpt.model_id)
    tok = load_tokenizer(ckpt.folder)
    train, dev = read_corpus(cfg.data, "train", tok), read_corpus(cfg.data, "dev", tok)
    model = LlamaModel(ckpt.args)
    model.load_hf_state_dict(ckpt.state_dict)
    model.float().eval()
    scfg = cfg.stream(ckpt.model_id, train.digest(), dev.digest())
    work = Path(cfg.work_dir) if cfg.work_dir else cache_root() / "train-less"
    run_dir = work / f"stream-{'+'.join(scfg.policies)}-b{cfg.budget}"
    sources = {"data": train.paths, "texts": train.names, "sha256": train.sha256, "split_rule": SPLIT_RULE,
               "train_tokens_available": train.tokens()}
    meta = {"command": command, "split_rule": SPLIT_RULE, "data_sources": sources, "dev_tokens_per_text": dev.tokens(),
            "model_fingerprint": model_fingerprint(ckpt.args, ckpt.folder), "run_dir": run_dir.name}
    print(f"streaming stage: {scfg.windows} windows of {scfg.seq_len} tokens, policies {','.join(scfg.policies)}, "
          f"run directory {run_dir}", file=sys.stderr)
    weights = train_stream(model, train, dev, scfg, run_dir, resume=cfg.resume, device=pick_device(cfg.device),
                           meta=meta)
    for p, path in outs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        weights[p].save(path)
        m = weights[p].manifest
        print(f"{p}: {path}  dev/sparse-only {m['dev']['ratio']:.3f} (mean over layers), "
              f"{m['tokens']['per_layer']:,} tokens per layer", file=sys.stderr)
    return list(outs.values())
