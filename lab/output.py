"""Writing results: JSON rows, a markdown table, progress to stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_json(path: str | Path | None, rows: list[dict]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=2) + "\n")


def markdown_table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))  # every row's keys, first seen first
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def progress_bar(**kw):
    """A tqdm progress bar on stderr (tqdm is imported here, lazily: only the lab needs it)."""
    from tqdm import tqdm

    return tqdm(file=sys.stderr, **kw)
