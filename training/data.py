"""Training text for LESS weights: UTF-8 files (or a directory of them) -> token sequences.

The last `holdout` fraction of every file (by characters, the same cut `eval ppl --tail-fraction`
makes) is never read for training. Sequences are non-overlapping blocks chosen with a seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from lessserve.workers.errors import ConfigError


class TrainingDataError(ConfigError):
    """Training data paths are missing, unreadable or hold no usable text."""


def text_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and directories (recursively, sorted) into a file list."""
    out: list[Path] = []
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise TrainingDataError(f"no such file or directory: {p}")
    if not out:
        raise TrainingDataError(f"no files found under {', '.join(map(str, paths))}")
    return out


def read_training_text(paths: Sequence[str | Path], holdout: float = 0.1) -> tuple[str, str]:
    """Returns (training text, sha256 of the files' full bytes in order)."""
    h = hashlib.sha256()
    parts = []
    for f in text_files(paths):
        raw = f.read_bytes()
        h.update(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TrainingDataError(f"{f} is not UTF-8 text: {e}") from None
        parts.append(text[: int(len(text) * (1 - holdout))])
    text = "\n\n".join(p for p in parts if p.strip())
    if not text.strip():
        raise TrainingDataError("training data is empty")
    return text, h.hexdigest()


def token_blocks(ids: Sequence[int], seq_len: int, num_seqs: int, seed: int) -> torch.Tensor:
    """`num_seqs` non-overlapping blocks of `seq_len` tokens, chosen with `seed`. -> [N, T] long."""
    t = torch.as_tensor(list(ids), dtype=torch.long)
    n_blocks = len(t) // seq_len
    if n_blocks == 0:
        raise TrainingDataError(f"training text has {len(t)} tokens, fewer than --seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_blocks, generator=g)[: min(num_seqs, n_blocks)].sort().values
    return t[: n_blocks * seq_len].view(n_blocks, seq_len)[pick]


def split_train_val(n: int, seed: int, val_fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """Seeded 90/10 split of sequence indices (at least one of each when n >= 2)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    n_val = min(max(1, round(n * val_fraction)), n - 1) if n >= 2 else 0
    return sorted(perm[n_val:]), sorted(perm[:n_val])
