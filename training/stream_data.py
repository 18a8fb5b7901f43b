"""The token stream of the streaming per-layer stage: every file's train part cut into
non-overlapping windows of `seq_len` tokens, interleaved file by file, addressable by a cursor.

Pass p (p = 0, 1, ...) is planned from (seed, p) alone:
  - each file is cut at a seeded offset (0 on pass 0, so pass 0 is the plain cut; later passes
    see other cuts of the same text) into n_f windows, visited in a seeded random order;
  - the files take turns in a seeded rotation order; a file that runs out leaves the rotation;
  - when every file has run out, pass p + 1 starts.
Window `cursor` of the stream is therefore a pure function of (texts, seq_len, seed, cursor): a
resumed run continues exactly where it stopped, and nothing of the corpus is written to disk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from lessserve.training.data import Corpus, TrainingDataError


def derived_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across runs and platforms, unlike hash())."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class Window:
    tokens: torch.Tensor  # [T] long
    text: str  # the file's text name
    start: int  # first token's index in that file's train part
    pass_: int  # stream pass (0 = first time through the data)


class WindowStream:
    def __init__(self, corpus: Corpus, seq_len: int, seed: int):
        self.names = list(corpus.names)
        self.ids = [torch.as_tensor(i, dtype=torch.long) for i in corpus.ids]
        self.seq_len, self.seed = seq_len, seed
        if not any(len(i) >= seq_len for i in self.ids):
            raise TrainingDataError(f"no file has --seq-len {seq_len} tokens in its {corpus.part} part")
        self._plans: dict[int, list[tuple[int, int]]] = {}
        self._lengths: list[int] = []  # windows per pass, passes 0.. planned so far

    def _offsets(self, p: int) -> list[int]:
        if p == 0:
            return [0] * len(self.ids)
        gen = torch.Generator().manual_seed(derived_seed("offsets", self.seed, p))
        return [int(torch.randint(0, self.seq_len, (1,), generator=gen)) if len(i) >= 2 * self.seq_len else 0
                for i in self.ids]

    def plan(self, p: int) -> list[tuple[int, int]]:
        """Pass p as (file index, start token) per window, in stream order."""
        if p not in self._plans:
            gen = torch.Generator().manual_seed(derived_seed("pass", self.seed, p))
            per_file = []
            for ids, off in zip(self.ids, self._offsets(p), strict=True):
                n = (len(ids) - off) // self.seq_len
                per_file.append([off + int(j) * self.seq_len for j in torch.randperm(n, generator=gen)])
            rotation = torch.randperm(len(self.ids), generator=gen).tolist()
            rounds = max(len(s) for s in per_file)
            self._plans = {p: [(f, per_file[f][r]) for r in range(rounds) for f in rotation if r < len(per_file[f])]}
        return self._plans[p]

    def pass_length(self, p: int) -> int:
        while len(self._lengths) <= p:
            q = len(self._lengths)
            self._lengths.append(sum((len(i) - o) // self.seq_len for i, o in zip(self.ids, self._offsets(q),
                                                                                  strict=True)))
        return self._lengths[p]

    def locate(self, cursor: int) -> tuple[int, int]:
        """Window index -> (pass, index within the pass)."""
        p = 0
        while cursor >= self.pass_length(p):
            cursor -= self.pass_length(p)
            p += 1
        return p, cursor

    def window(self, cursor: int) -> Window:
        p, j = self.locate(cursor)
        f, start = self.plan(p)[j]
        return Window(self.ids[f][start:start + self.seq_len], self.names[f], start, p)
