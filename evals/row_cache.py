"""A resumable row cache for long evaluations (the quality report runs ~150 engine passes).

Each finished row is appended to a JSONL file under a key that names everything the row depends
on: the evaluation, its inputs' hash, the engine configuration and the LESS weights' content
digest. A re-run (after an interruption, or with new kernels) recomputes only rows whose key
changed, so retrained +less rows never reuse stale numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lessserve.lab.engines import row_key  # noqa: F401  (re-exported)


def digest_ids(seqs) -> str:
    """Hash of token id lists (windows or prompts)."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(json.dumps(list(s)).encode())
    return h.hexdigest()[:16]


class RowCache:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.rows: dict[str, dict] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.rows[rec["key"]] = rec["row"]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted write
        self.hits = 0

    def get(self, key: str) -> dict | None:
        row = self.rows.get(key)
        if row is not None:
            self.hits += 1
            return dict(row)
        return None

    def put(self, key: str, row: dict) -> None:
        self.rows[key] = dict(row)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "row": row}) + "\n")
