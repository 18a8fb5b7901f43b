"""`lessserve` console script: one subcommand per module in `lessserve.cluster.commands`.

Every user error exits 2 with one line naming the flag; nothing prints a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lessserve.cluster.commands.common import CliError

# Each module exposes register(subparsers) and sets a `func(args) -> int` default.
COMMAND_MODULES = ["generate", "chat", "evaluate", "bench", "serve", "train_kernels"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lessserve", description="LESS-compressed multi-turn LLM serving")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"lessserve.cluster.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    from lessserve.workers.errors import (
        LessKernelsMissingError,
        LessServeError,
        ModelNotFoundError,
        UnsupportedModelError,
    )

    flag_of = {LessKernelsMissingError: "--policy", ModelNotFoundError: "--model", UnsupportedModelError: "--model"}

    try:
        return int(args.func(args) or 0)
    except CliError as e:
        parser.exit(2, f"lessserve {args.command}: error: {e}\n")
    except LessServeError as e:
        flag = next((f for t, f in flag_of.items() if isinstance(e, t)), None)
        parser.exit(2, f"lessserve {args.command}: error: {flag + ': ' if flag else ''}{e}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
