"""`lessserve train-kernels`: train LESS kernels (phi/psi) for a model, policy and budget."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from lessserve.cluster.commands.common import CliError


def register(sub) -> None:
    p = sub.add_parser("train-kernels", help="train LESS kernels on text (frozen model, per layer)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="alias, HF folder, cached hub id or .gguf")
    p.add_argument("--policy", default="h2o", choices=["h2o", "lambda"], help="eviction policy the kernels serve")
    p.add_argument("--budget", type=int, default=128, help="cached tokens per layer and KV head")
    p.add_argument("--data", nargs="+", required=True, help="UTF-8 text files or directories")
    p.add_argument("--holdout", type=float, default=0.1, help="last fraction of every file never trained on")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64, help="hidden width R' of phi/psi")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--num-seqs", type=int, default=24)
    p.add_argument("--batch", type=int, default=2, help="sequences per optimiser step")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--query-chunks", type=int, default=8,
                   help="query chunks per sequence (seeded per layer) used as training positions; 0 = all")
    p.add_argument("--chunk", type=int, default=32, help="engine prefill chunk the masks replay")
    p.add_argument("--recent", type=int, default=None, help="h2o recent window (default budget/2)")
    p.add_argument("--sink", type=int, default=4, help="lambda sink tokens")
    p.add_argument("--qkv-source", default="full", choices=["full", "compressed"],
                   help="Q/K/V from the full-cache forward (paper) or from the base policy's serving run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="kernels .safetensors (default: shipped location)")
    p.add_argument("--work-dir", default=None, help="captures and finished layers (default: cache dir)")
    p.add_argument("--resume", action="store_true", help="keep finished layers of an interrupted run")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--init", default=None,
                   help="start from these kernels (.safetensors) instead of training layer by layer")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="then fine-tune all layers end to end (KL to the full model) for this many sequences")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--finetune-seqs", type=int, default=64, help="sequences of --seq-len for the end-to-end stage")
    p.add_argument("--finetune-eval-every", type=int, default=10, help="steps between validation passes")
    p.set_defaults(func=run)


def _check(args) -> None:
    for flag, val, lo, hi in (("--budget", args.budget, 2, 65536), ("--rank", args.rank, 1, 256),
                              ("--hidden", args.hidden, 1, 4096), ("--epochs", args.epochs, 1, 1000),
                              ("--seq-len", args.seq_len, 16, 65536), ("--num-seqs", args.num_seqs, 2, 100000),
                              ("--batch", args.batch, 1, 1024), ("--chunk", args.chunk, 1, 8192),
                              ("--threads", args.threads, 1, 1024), ("--finetune-steps", args.finetune_steps, 0, 10**6),
                              ("--finetune-seqs", args.finetune_seqs, 2, 100000),
                              ("--finetune-eval-every", args.finetune_eval_every, 1, 10**6)):
        if not lo <= val <= hi:
            raise CliError(flag, f"must be in [{lo}, {hi}], got {val}")
    if args.seq_len <= args.budget + args.chunk:
        raise CliError("--seq-len", f"must exceed --budget + --chunk ({args.budget + args.chunk}) for evictions")
    if args.seq_len % args.chunk:
        raise CliError("--seq-len", f"must be a multiple of --chunk ({args.chunk})")
    if not 0 <= args.holdout < 1:
        raise CliError("--holdout", "must be in [0, 1)")
    for flag, lr in (("--lr", args.lr), ("--finetune-lr", args.finetune_lr)):
        if not 0 < lr < 1:
            raise CliError(flag, "must be in (0, 1)")
    if args.init is not None and not Path(args.init).is_file():
        raise CliError("--init", f"no such kernels file: {args.init}")
    if args.init is not None and not args.finetune_steps:
        raise CliError("--init", "only makes sense with --finetune-steps > 0")


LOCATION_FLAGS = ("--work-dir", "--out", "--threads", "--device")  # where/how fast, never what is learned


def recorded_command(argv: list[str]) -> str:
    """The command for the manifest: location flags dropped, --data/--init paths relative to the
    working directory (a manifest must not carry one machine's paths)."""
    out, it = [], iter(argv)
    for a in it:
        flag = a.split("=", 1)[0]
        if flag in LOCATION_FLAGS or flag == "--resume":
            if "=" not in a and flag != "--resume":
                next(it, None)
            continue
        out.append(os.path.relpath(a) if os.path.isabs(a) and os.path.exists(a) else a)
    return "lessserve " + shlex.join(out)


def run(args) -> int:
    _check(args)
    import torch

    from lessserve.workers.engine import pick_device
    from lessserve.workers.less_weights import SHIPPED_DIR, LessKernels
    from lessserve.workers.model import LlamaModel
    from lessserve.workers.model_loader import cache_root, load_checkpoint, load_tokenizer
    from lessserve.workers.train_data import TrainingDataError, read_training_text, token_blocks
    from lessserve.workers.train_e2e import FinetuneConfig, run_finetune
    from lessserve.workers.train_kernels import TrainConfig, policy_spec, run_training

    torch.set_num_threads(args.threads)
    try:
        text, sha = read_training_text(args.data, args.holdout)
    except TrainingDataError as e:
        raise CliError("--data", str(e)) from None
    ckpt = load_checkpoint(args.model)
    tok = load_tokenizer(ckpt.folder)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    try:
        seqs = token_blocks(ids, args.seq_len, args.num_seqs, args.seed)
    except TrainingDataError as e:
        raise CliError("--data", str(e)) from None
    if len(seqs) < 2:
        raise CliError("--data", f"need at least 2 sequences of --seq-len {args.seq_len} tokens, got {len(seqs)}")
    model = LlamaModel(ckpt.args)
    model.load_hf_state_dict(ckpt.state_dict)
    model.float().eval()
    command = recorded_command(sys.argv[1:])
    cfg = TrainConfig(model=ckpt.model_id, policy=args.policy, budget=args.budget, rank=args.rank,
                      hidden=args.hidden, epochs=args.epochs, seed=args.seed, chunk=args.chunk, recent=args.recent,
                      sink=args.sink, lr=args.lr, batch=args.batch, query_chunks=args.query_chunks,
                      qkv_source=args.qkv_source, data_sha256=sha, command=command,
                      extra={"data": [os.path.relpath(d) for d in args.data], "holdout": args.holdout})
    work = Path(args.work_dir) if args.work_dir else cache_root() / "train-kernels"
    device = pick_device(args.device)
    if args.init:
        kernels = LessKernels.load(args.init)
        if kernels.manifest.get("model") != ckpt.model_id or kernels.manifest.get("policy") != args.policy:
            raise CliError("--init", f"kernels are for {kernels.manifest.get('model')}/{kernels.manifest.get('policy')}"
                                     f", not {ckpt.model_id}/{args.policy}")
    else:
        kernels = run_training(model, seqs, cfg, work, resume=args.resume, device=device)
    if args.finetune_steps:
        ft_seqs = token_blocks(ids, args.seq_len, args.finetune_seqs, args.seed + 1)
        ft = FinetuneConfig(steps=args.finetune_steps, lr=args.finetune_lr, eval_every=args.finetune_eval_every,
                            seed=args.seed)
        kernels = run_finetune(model, kernels, ft_seqs, policy_spec(cfg), args.chunk, ft, work, command,
                               resume=args.resume, device=device)
    out = Path(args.out) if args.out else SHIPPED_DIR / f"{ckpt.model_id}-{args.policy}-b{args.budget}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    kernels.save(out)
    for s in kernels.manifest["layers"]:
        print(f"layer {s['layer']:2d}: val {s['val_loss']:.4g}  sparse-only {s['sparse_val_loss']:.4g}  "
              f"(best epoch {s['best_epoch']})", file=sys.stderr)
    print(out)
    return 0
