"""`lessserve train-less` (old name `train-kernels`): train the learned LESS weights (phi/psi) of a
model, policy and budget (`--stream-tokens N`: the streaming per-layer stage, for one or several
`--policies`). Flags are the fields of TrainLessConfig, defaults read from it."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from pydantic import ValidationError

from lessserve.cli.flags import existing_file, from_validation, help_of

# flags whose value is a number, a choice or a switch (the rest are strings); every flag is a field
_TYPES = {"budget": int, "rank": int, "hidden": int, "epochs": int, "seq_len": int, "num_seqs": int, "batch": int,
          "lr": float, "query_chunks": int, "chunk": int, "recent": int, "sink": int, "seed": int, "threads": int,
          "finetune_steps": int, "finetune_lr": float, "finetune_seqs": int, "finetune_eval_every": int,
          "finetune_warmup": int, "finetune_dropout": float, "finetune_patience": int, "dev_seqs": int,
          "stream_tokens": int, "stream_warmup": int, "stream_lr_floor": float, "stream_eval_every": int,
          "stream_checkpoint_every": int, "stream_export_every": int, "stream_dev_chunks": int}
_SWITCHES = ("resume", "finetune_bf16")
OLD_NAME = "train-kernels"


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def flag_table() -> dict[str, str]:
    from lessserve.training.config import TrainLessConfig

    return {_flag(f): f for f in TrainLessConfig.model_fields}


def register(sub) -> None:
    from lessserve.training.config import TrainLessConfig as C

    p = sub.add_parser("train-less", aliases=[OLD_NAME],
                       help="train LESS weights on text (frozen model: per layer, then end to end)")
    for field in C.model_fields:
        help_ = help_of(C, field) if field != "data" else C.model_fields[field].description.replace("%", "%%")
        kw: dict = {"default": None, "help": help_}
        if field == "data":
            kw.update(nargs="+")
        elif field in _SWITCHES:
            kw = {"action": "store_true", "default": None, "help": help_of(C, field)}
        elif field in ("policy", "qkv_source", "finetune_schedule"):
            kw["choices"] = list(C.model_fields[field].annotation.__args__)
        elif field in _TYPES:
            kw["type"] = _TYPES[field]
        p.add_argument(_flag(field), **kw)
    p.set_defaults(func=run)


LOCATION_FLAGS = ("--work-dir", "--out", "--stage1-out", "--threads", "--device", "--stream-checkpoint-every",
                  "--stream-export-every")  # where/how fast/how often saved, not what is learned


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


def config_from_args(args: argparse.Namespace):
    from lessserve.training.config import TrainLessConfig

    if args.init is not None:
        existing_file("--init", args.init)
    fields = {f: getattr(args, f) for f in TrainLessConfig.model_fields if getattr(args, f) is not None}
    try:
        return TrainLessConfig(**fields)
    except ValidationError as e:
        raise from_validation(e, flag_table()) from None


def run(args) -> int:
    if args.command == OLD_NAME:
        print(f"lessserve: `{OLD_NAME}` is deprecated and will be removed; use `train-less`", file=sys.stderr)
    cfg = config_from_args(args)
    from lessserve.training.run import train_less, train_stream_less

    if cfg.stream_tokens:
        for path in train_stream_less(cfg, recorded_command(sys.argv[1:])):
            print(path)
        return 0
    print(train_less(cfg, recorded_command(sys.argv[1:])))
    return 0
