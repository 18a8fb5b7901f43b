"""Flag parsing the commands share. Defaults come from the pydantic config models (shown in
--help); a bad value raises CliError naming the flag (exit code 2, one line)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pydantic import BaseModel, ValidationError

from lessserve.errors.tree import ConfigError

# engine flag -> EngineConfig field: one table to build the config and to name a bad value's flag
ENGINE_FLAGS = {"--model": "model", "--policy": "policy", "--budget": "budget", "--recent": "recent",
                "--sink": "sink", "--less-weights": "less_weights", "--chunk": "prefill_chunk",
                "--device": "device", "--dtype": "dtype", "--kernels": "kernels", "--max-model-len": "max_model_len",
                "--chat-template": "chat_template", "--recall-pages": "recall_pages", "--recall-page": "recall_page",
                "--recall-queries": "recall_queries", "--recall-reread": "recall_reread",
                "--recall-heads": "recall_heads", "--recall-lead": "recall_lead",
                "--recall-layer": "recall_layer",
                "--history-bytes": "history_bytes", "--kv-bits": "kv_bits"}


class CliError(ConfigError):
    """A bad flag value; the message starts with the flag's name."""

    def __init__(self, flag: str, msg: str):
        super().__init__(f"{flag}: {msg}")
        self.flag = flag


def default_of(model: type[BaseModel], field: str):
    """A config model's default for `field` (CLI defaults are read from the config, never repeated)."""
    return model.model_fields[field].get_default(call_default_factory=True)


def help_of(model: type[BaseModel], field: str, extra: str = "") -> str:
    f = model.model_fields[field]
    return f"{f.description or field}{extra} (default: {default_of(model, field)})".replace("%", "%%")


def flag_of(loc: tuple, table: dict[str, str]) -> str:
    """The flag whose field a pydantic error location names (else the field as a flag)."""
    name = str(loc[-1]) if loc else ""
    by_field = {v.split(".")[-1]: k for k, v in table.items()}
    return by_field.get(name, "--" + name.replace("_", "-"))


def from_validation(e: ValidationError, table: dict[str, str]) -> CliError:
    """The first error of a config's validation, against its flag. A check across fields (no
    location) names its field first: "seq_len: must be ..."."""
    err = e.errors()[0]
    loc, msg = tuple(err["loc"]), err["msg"].removeprefix("Value error, ")
    if not loc and ": " in msg:
        field, msg = msg.split(": ", 1)
        loc = (field,)
    for flag, field in table.items():  # the fields a message names, spelled as the user typed them
        msg = re.sub(rf"\b{re.escape(field.split('.')[-1])}\b", flag, msg)
    return CliError(flag_of(loc, table), msg)


def parse_policies(flag: str, value: str) -> list[str]:
    from lessserve.workers.compression import Policy

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


def parse_names(flag: str, value: str, allowed) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise CliError(flag, f"unknown {bad or value!r}; expected a subset of {','.join(allowed)}")
    return names


def in_range(flag: str, value: float, lo: float, hi: float) -> None:
    """A numeric flag within [lo, hi], else a CliError naming it."""
    if not lo <= value <= hi:
        raise CliError(flag, f"must be in [{lo}, {hi}], got {value}")


def existing_file(flag: str, value: str) -> Path:
    p = Path(value).expanduser()
    if not p.exists():
        raise CliError(flag, f"no such file or directory: {value}")
    return p


class DeprecatedAlias(argparse.Action):
    """An old flag spelling kept for one release: stores into the new flag's dest, says so once."""

    def __init__(self, option_strings, dest, new: str, **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"lessserve: {option_string} is deprecated and will be removed; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_engine_flags(p: argparse.ArgumentParser, policy_default: str | None = None) -> None:
    """Flags every engine-backed command shares; unset flags fall back to env, then EngineConfig."""
    from lessserve.workers.config import EngineConfig as E

    p.add_argument("--model", default=None, help=help_of(E, "model"))
    p.add_argument("--policy", default=policy_default, help=help_of(E, "policy"))
    p.add_argument("--budget", type=int, default=None, help=help_of(E, "budget"))
    p.add_argument("--recent", type=int, default=None, help=help_of(E, "recent"))
    p.add_argument("--sink", type=int, default=None, help=help_of(E, "sink"))
    p.add_argument("--less-weights", default=None, help=help_of(E, "less_weights").split(";")[0] + ")")
    p.add_argument("--less-kernels", dest="less_weights", action=DeprecatedAlias, new="--less-weights",
                   help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=None, help=help_of(E, "prefill_chunk"))
    p.add_argument("--device", default=None, help=help_of(E, "device"))
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help=help_of(E, "dtype"))
    p.add_argument("--kernels", default=None, choices=["auto", "torch", "triton"],
                   help=help_of(E, "kernels", "; env LESSSERVE_KERNELS"))
    p.add_argument("--max-model-len", type=int, default=None, help=help_of(E, "max_model_len"))
    p.add_argument("--chat-template", default=None, help=help_of(E, "chat_template"))
    p.add_argument("--kv-bits", default=None, metavar="{native,8,4}", help=help_of(E, "kv_bits"))
    for flag in ("--recall-pages", "--recall-page", "--recall-queries", "--recall-reread", "--recall-layer",
                 "--recall-heads", "--recall-lead", "--history-bytes"):
        p.add_argument(flag, type=int, default=None, help=help_of(E, ENGINE_FLAGS[flag]))


def engine_config(args: argparse.Namespace, **over):
    """The EngineConfig of the shared flags: flags, then LESSSERVE_* env, then the config's defaults
    (the same sources `lessserve serve` reads). A bad value is reported against its flag."""
    from lessserve.cluster.config import load_config

    fields = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field in ENGINE_FLAGS.items()}
    fields.update(over)
    if fields.get("less_weights"):
        existing_file("--less-weights", fields["less_weights"])
    try:
        return load_config(overrides={f"engine.{k}": v for k, v in fields.items()}).engine
    except ValidationError as e:
        raise from_validation(e, ENGINE_FLAGS) from None
