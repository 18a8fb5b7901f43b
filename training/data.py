"""Training text for LESS weights: the `train` part of each file (lab/corpus.py's one split rule),
tokenised per file, cut into non-overlapping token blocks, an equal share from every file.

The `dev` part of each file gives the validation sequences of the end-to-end stage (the step it
keeps is chosen there); `test` is never read by training.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lessserve.lab.corpus import SPLIT_RULE, CorpusError, read_file, split_part, text_name
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


@dataclass
class Corpus:
    """Token ids of one split part of every file, in file order."""

    part: str
    names: list[str]
    ids: list[list[int]]
    sha256: dict[str, str]  # name -> sha256 of the whole file's bytes
    paths: list[str] = field(default_factory=list)

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.part}|{SPLIT_RULE}".encode())
        for n in self.names:
            h.update(self.sha256[n].encode())
        return h.hexdigest()

    def tokens(self) -> dict[str, int]:
        return {n: len(i) for n, i in zip(self.names, self.ids, strict=True)}


def read_corpus(paths: Sequence[str | Path], part: str, tokenizer) -> Corpus:
    """Tokenise the `part` (train | dev) of every file under the split rule."""
    if part == "test":
        raise TrainingDataError("training never reads the test part")
    names, ids, shas, rel = [], [], {}, []
    for f in text_files(paths):
        try:
            text, sha = read_file(f)
        except CorpusError as e:
            raise TrainingDataError(str(e)) from None
        name = text_name(f)
        if name in shas:
            name = f"{name}:{len(names)}"
        piece = split_part(text, part)
        if not piece.strip():
            continue
        names.append(name)
        shas[name] = sha
        rel.append(os.path.relpath(f))
        ids.append(tokenizer(piece, add_special_tokens=False)["input_ids"])
    if not names:
        raise TrainingDataError(f"training data is empty (no text in the {part} part of {', '.join(map(str, paths))})")
    return Corpus(part, names, ids, shas, rel)


def token_blocks(ids: Sequence[int], seq_len: int, num_seqs: int, seed: int) -> torch.Tensor:
    """`num_seqs` non-overlapping blocks of `seq_len` tokens, chosen with `seed`. -> [N, T] long."""
    t = torch.as_tensor(list(ids), dtype=torch.long)
    n_blocks = len(t) // seq_len
    if n_blocks == 0:
        raise TrainingDataError(f"training text has {len(t)} tokens, fewer than --seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_blocks, generator=g)[: min(num_seqs, n_blocks)].sort().values
    return t[: n_blocks * seq_len].view(n_blocks, seq_len)[pick]


def mixture_blocks(corpus: Corpus, seq_len: int, num_seqs: int, seed: int) -> tuple[torch.Tensor, dict[str, int]]:
    """An equal share of `num_seqs` blocks from every file (a file with fewer blocks gives all it has;
    the rest is shared out among the others), interleaved file by file. -> ([N, T], name -> blocks)."""
    avail = {n: len(i) // seq_len for n, i in zip(corpus.names, corpus.ids, strict=True)}
    if not any(avail.values()):
        raise TrainingDataError(f"no file has --seq-len {seq_len} tokens in its {corpus.part} part")
    share = dict.fromkeys(corpus.names, 0)
    left = num_seqs
    while left > 0:
        open_ = [n for n in corpus.names if share[n] < avail[n]]
        if not open_:
            break
        for n in open_:
            if left == 0:
                break
            share[n] += 1
            left -= 1
    per = [token_blocks(i, seq_len, share[n], seed + k) if share[n] else torch.empty(0, seq_len, dtype=torch.long)
           for k, (n, i) in enumerate(zip(corpus.names, corpus.ids, strict=True))]
    order = [(j, k) for j in range(max(share.values())) for k in range(len(per)) if j < len(per[k])]
    return torch.stack([per[k][j] for j, k in order]), share


def evenly_spaced_blocks(ids: Sequence[int], seq_len: int, n: int) -> torch.Tensor:
    """`n` evenly spaced non-overlapping blocks (deterministic; fewer if the text is short)."""
    t = torch.as_tensor(list(ids), dtype=torch.long)
    n = min(n, len(t) // seq_len)
    starts = [round(i * (len(t) - seq_len) / max(n - 1, 1)) for i in range(n)]
    return torch.stack([t[s:s + seq_len] for s in starts]) if n else torch.empty(0, seq_len, dtype=torch.long)


def dev_blocks(corpus: Corpus, seq_len: int, per_text: int) -> tuple[torch.Tensor, list[str]]:
    """`per_text` evenly spaced blocks of every file's dev part. -> ([N, T], text name of each)."""
    blocks, names = [], []
    for n, i in zip(corpus.names, corpus.ids, strict=True):
        b = evenly_spaced_blocks(i, seq_len, per_text)
        blocks.append(b)
        names += [n] * len(b)
    if not names:
        raise TrainingDataError(f"no file has --seq-len {seq_len} tokens in its dev part")
    return torch.cat(blocks), names


def split_train_val(n: int, seed: int, val_fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """Seeded 90/10 split of sequence indices (at least one of each when n >= 2)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    n_val = min(max(1, round(n * val_fraction)), n - 1) if n >= 2 else 0
    return sorted(perm[n_val:]), sorted(perm[:n_val])
