"""The project's texts and their one fixed train/dev/test split, used by training and evaluation alike.

Rule (SPLIT_RULE): by characters, each file's first 90% is `train`, the next 5% `dev`, the last 5%
`test`; each cut moves forward to just after the next newline, so every part starts on a line. LESS
weights are trained on `train` only, every variant and setting is chosen on `dev` only, and reports
quote `test` only. The cuts depend on nothing but the file's text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from lessserve.errors.tree import ConfigError

DATA_DIR = Path("../shared/data")  # beside the checkout (CI too)
TEXTS = {"brown": "brown.txt", "tinyshakespeare": "tinyshakespeare.txt", "python_docs": "python_docs.txt"}
PARTS = {"train": (0.0, 0.90), "dev": (0.90, 0.95), "test": (0.95, 1.0)}
SPLIT_RULE = ("by characters: first 90% train, next 5% dev, last 5% test of each file; "
              "each cut moved forward to just after the next newline")


class CorpusError(ConfigError):
    """A text of the corpus is missing, unreadable, or a part name is unknown."""


def _cut(text: str, fraction: float) -> int:
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return len(text)
    i = int(len(text) * fraction)
    nl = text.find("\n", i)
    return len(text) if nl < 0 else nl + 1


def part_bounds(text: str, part: str) -> tuple[int, int]:
    """Character range [lo, hi) of `part` (train | dev | test) in `text`."""
    if part not in PARTS:
        raise CorpusError(f"unknown split part {part!r}; expected one of {', '.join(PARTS)}")
    lo, hi = PARTS[part]
    return _cut(text, lo), _cut(text, hi)


def split_part(text: str, part: str) -> str:
    lo, hi = part_bounds(text, part)
    return text[lo:hi]


def read_file(path: str | Path) -> tuple[str, str]:
    """UTF-8 text of a file and the sha256 of its bytes."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8"), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError as e:
        raise CorpusError(f"{p} is not UTF-8 text: {e}") from None


def read_part(path: str | Path, part: str) -> str:
    """The `part` of one file under SPLIT_RULE."""
    return split_part(read_file(path)[0], part)


def corpus_paths(data_dir: str | Path = DATA_DIR, names: list[str] | None = None) -> dict[str, Path]:
    """name -> path of the project's texts (all three by default)."""
    names = list(TEXTS) if names is None else names
    unknown = [n for n in names if n not in TEXTS]
    if unknown:
        raise CorpusError(f"unknown text {unknown[0]!r}; expected one of {', '.join(TEXTS)}")
    return {n: Path(data_dir) / TEXTS[n] for n in names}


def shared_parts(part: str, data_dir: str | Path = DATA_DIR) -> dict[str, str]:
    """The `part` of every shared text by name (where the recall benchmark's filler turns come from)."""
    return {name: read_part(path, part) for name, path in corpus_paths(data_dir).items()}


def text_name(path: str | Path) -> str:
    """Short name of a file: its corpus name when it is one of TEXTS, else its stem."""
    p = Path(path)
    for n, f in TEXTS.items():
        if p.name == f:
            return n
    return p.stem
