"""One loaded model, many engine configurations (evaluations and benchmarks), and result keys."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine, pick_device
from lessserve.workers.model_loader import load_checkpoint, load_tokenizer


def row_key(**parts) -> str:
    """A short stable hash of everything a result depends on (JSON of the parts, keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class EngineFactory:
    """Loads the checkpoint once; `make(policy, budget)` returns an engine sharing its weights."""

    base: EngineConfig

    def __post_init__(self):
        self.ckpt = load_checkpoint(self.base.model)
        self.tokenizer = load_tokenizer(self.ckpt.folder)
        self.device = pick_device(self.base.device)
        self._first: Engine | None = None

    def make(self, policy: str, budget: int, max_slots: int = 1, **cfg) -> Engine:
        cfg = self.base.model_copy(update={"policy": policy, "budget": budget, "max_slots": max_slots, **cfg})
        if self._first is None:
            self._first = Engine(cfg, checkpoint=self.ckpt, tokenizer=self.tokenizer)
            return self._first
        return Engine(cfg, checkpoint=self.ckpt, tokenizer=self.tokenizer, model=self._first.model)

    def row_key(self, engine: Engine, kind: str, **inputs) -> str:
        """Cache key of one evaluation row: everything the number depends on."""
        return row_key(kind=kind, engine=engine.cfg.model_dump(mode="json"), model=self.ckpt.model_id,
                       less=engine.less_digest, **inputs)
