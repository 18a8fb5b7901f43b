"""`lessserve` console script: one subcommand (or group) per module of lessserve.cli.

The one place where errors become exit codes: every LessServeError exits 2 with one line (naming
the flag where one is to blame); nothing prints a traceback for a known condition.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from lessserve.cli import bench, chat, evals, generate, serve, train
from lessserve.cli.flags import ENGINE_FLAGS, CliError
from lessserve.errors.tree import ConfigError, LessServeError

COMMANDS = (generate, chat, evals, bench, serve, train)  # each: register(subparsers)


def blamed_flag(e: LessServeError) -> str | None:
    """The flag a known error is about, by error class (None: the message says it all)."""
    from lessserve.kernels.errors import KernelUnavailableError
    from lessserve.training.data import TrainingDataError
    from lessserve.training.run import InitWeightsError
    from lessserve.workers.errors import LessWeightsMissingError, ModelNotFoundError, UnsupportedModelError

    table = {LessWeightsMissingError: "--policy", ModelNotFoundError: "--model", UnsupportedModelError: "--model",
             KernelUnavailableError: "--kernels", TrainingDataError: "--data", InitWeightsError: "--init"}
    by_class = next((f for t, f in table.items() if isinstance(e, t)), None)
    if by_class is None and isinstance(e, ConfigError):  # the engine names a bad field first: its flag
        by_class = next((f for f, field in ENGINE_FLAGS.items() if re.match(rf"{field}\b", str(e))), None)
    return by_class


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lessserve", description="LESS-compressed multi-turn LLM serving")
    sub = p.add_subparsers(dest="command", required=True)
    for mod in COMMANDS:
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        parser.exit(2, f"lessserve {args.command}: error: {e}\n")
    except LessServeError as e:
        flag = blamed_flag(e)
        parser.exit(2, f"lessserve {args.command}: error: {flag + ': ' if flag else ''}{e}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
