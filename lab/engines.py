"""One loaded model, many engine configurations (evaluations and benchmarks), and result keys."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lessserve.lab.output import progress
from lessserve.workers.compression import Policy
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine, pick_device
from lessserve.workers.errors import LessWeightsMissingError
from lessserve.workers.less_weights import SHIPPED_DIR, shipped_weights_path
from lessserve.workers.model_loader import load_checkpoint, load_tokenizer


def less_weights_for(model_id: str, policy: str, budget: int) -> Path | None:
    """The LESS weights a study of `policy` at `budget` runs with, chosen explicitly: those shipped
    for this budget, else the policy's shipped weights of another budget (said on stderr, and the
    engine records it: `Engine.less_note`). None for a policy without LESS. Serving never does this:
    there a missing budget is an error (workers/less_weights.py)."""
    p = Policy.parse(policy)
    if not p.less:
        return None
    try:
        return shipped_weights_path(model_id, p.base, budget)
    except LessWeightsMissingError:
        others = sorted(SHIPPED_DIR.glob(f"{model_id}-{p.base}-b*.safetensors"))
        if not others:
            raise
        progress(f"note: {policy} at budget {budget} runs with {others[0].name} (no weights shipped for it)")
        return others[0]


def row_key(**parts) -> str:
    """A short stable hash of everything a result depends on (JSON of the parts, keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def with_less_weights(cfg: EngineConfig, model_id: str) -> EngineConfig:
    """`cfg` with its LESS weights chosen explicitly (less_weights_for) unless it names a file."""
    if cfg.less_weights:
        return cfg
    chosen = less_weights_for(model_id, cfg.policy, cfg.budget)
    return cfg.model_copy(update={"less_weights": str(chosen) if chosen else None})


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
        cfg = with_less_weights(
            self.base.model_copy(update={"policy": policy, "budget": budget, "max_slots": max_slots, **cfg}),
            self.ckpt.model_id)
        if self._first is None:
            self._first = Engine(cfg, checkpoint=self.ckpt, tokenizer=self.tokenizer)
            return self._first
        return Engine(cfg, checkpoint=self.ckpt, tokenizer=self.tokenizer, model=self._first.model)

    def row_key(self, engine: Engine, kind: str, **inputs) -> str:
        """Cache key of one evaluation row: everything the number depends on."""
        return row_key(kind=kind, engine=engine.cfg.model_dump(mode="json"), model=self.ckpt.model_id,
                       less=engine.less_digest, **inputs)
