"""Shared flag parsing for CLI commands: errors name the flag (exit code 2)."""

from __future__ import annotations

import argparse
from pathlib import Path


class CliError(Exception):
    """A bad flag value; the message starts with the flag's name."""

    def __init__(self, flag: str, msg: str):
        super().__init__(f"{flag}: {msg}")
        self.flag = flag


def parse_policies(flag: str, value: str) -> list[str]:
    from lessserve.workers.errors import ConfigError
    from lessserve.workers.policy import Policy

    out = []
    for name in filter(None, (v.strip() for v in value.split(","))):
        try:
            out.append(Policy.parse(name).name)
        except ConfigError as e:
            raise CliError(flag, str(e)) from None
    if not out:
        raise CliError(flag, "no policy given")
    return out


def parse_ints(flag: str, value: str, lo: int = 1, hi: int = 1 << 20) -> list[int]:
    try:
        vals = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise CliError(flag, f"expected comma-separated integers, got {value!r}") from None
    if not vals or any(not lo <= v <= hi for v in vals):
        raise CliError(flag, f"values must be integers in [{lo}, {hi}], got {value!r}")
    return vals


def in_range(flag: str, value: float, lo: float, hi: float) -> None:
    """A numeric flag within [lo, hi], else a CliError naming it."""
    if not lo <= value <= hi:
        raise CliError(flag, f"must be in [{lo}, {hi}], got {value}")


def existing_file(flag: str, value: str) -> Path:
    p = Path(value).expanduser()
    if not p.exists():
        raise CliError(flag, f"no such file or directory: {value}")
    return p


def add_engine_flags(p: argparse.ArgumentParser, policy_default: str = "h2o") -> None:
    """Flags every engine-backed command shares (model, policy, budget, kernels, device)."""
    p.add_argument("--model", default="smollm2-135m-instruct", help="alias, HF folder, cached hub id or .gguf")
    p.add_argument("--policy", default=policy_default, help="full | h2o | lambda [+less | +]")
    p.add_argument("--budget", type=int, default=128, help="cached tokens per layer and KV head")
    p.add_argument("--recent", type=int, default=None, help="h2o recent window (default budget/2)")
    p.add_argument("--sink", type=int, default=4, help="lambda sink tokens")
    p.add_argument("--less-kernels", default=None, help="LESS kernels .safetensors (default: shipped)")
    p.add_argument("--chunk", type=int, default=32, help="prefill chunk size")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--kernels", default=None, choices=["auto", "torch", "triton"],
                   help="kernel implementation (default: $LESSSERVE_KERNELS or auto)")


def engine_config(args: argparse.Namespace, **over):
    """Build an EngineConfig from the shared flags; a bad value is reported against its flag."""
    import os

    from pydantic import ValidationError

    from lessserve.workers.config import EngineConfig

    fields = {
        "model": args.model, "policy": args.policy, "budget": args.budget, "recent": args.recent,
        "sink": args.sink, "less_kernels": args.less_kernels, "prefill_chunk": args.chunk,
        "device": args.device, "dtype": args.dtype,
        "kernels": args.kernels or os.environ.get("LESSSERVE_KERNELS", "auto"),
    }
    fields.update(over)
    if fields["less_kernels"]:
        existing_file("--less-kernels", fields["less_kernels"])
    try:
        return EngineConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-").replace("prefill-chunk", "chunk")
        raise CliError(flag, err["msg"]) from None


def register_group(sub, name: str, help_: str, modules: list[str]) -> None:
    """A subcommand whose own subcommands come from modules of lessserve.cluster.commands, each
    exposing register(subparsers). A module not written yet is skipped."""
    import importlib

    p = sub.add_parser(name, help=help_)
    gsub = p.add_subparsers(dest=name, required=True)
    for mod_name in modules:
        full = f"lessserve.cluster.commands.{mod_name}"
        try:
            mod = importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name != full:
                raise
            continue
        mod.register(gsub)
