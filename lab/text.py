"""Text for evaluations and benchmarks: a file (or its tail) and fixed token windows of it."""

from __future__ import annotations

from pathlib import Path

from lessserve.errors.tree import ConfigError


def read_text(path: str | Path, max_chars: int | None = None, tail_fraction: float | None = None) -> str:
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if tail_fraction:
        text = text[int(len(text) * (1 - tail_fraction)):]
    return text[:max_chars] if max_chars else text


def token_windows(tokenizer, text: str, context: int, windows: int) -> list[list[int]]:
    """`windows` evenly spaced windows of `context` tokens (deterministic)."""
    need = context * windows
    ids = tokenizer(text[: max(need * 8, 100_000)], add_special_tokens=False)["input_ids"]
    if len(ids) < context:
        raise ConfigError(f"text has {len(ids)} tokens, fewer than --context {context}")
    if len(ids) < need:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    starts = [round(i * (len(ids) - context) / max(windows - 1, 1)) for i in range(min(windows, len(ids) // context))]
    return [ids[s : s + context] for s in starts]
