"""Policy names -> eviction specs. `h2o+less` adds the LESS state; `h2o+` is the equal-memory
baseline whose budget grows by the LESS state's size in tokens; `+recall` (h2o or lambda, with or
without `+less`) keeps every token's K/V in a host-side history and brings the pages the new
message asks for back into the slot at each turn (workers/history.py, kernels/reference/recall.py):
part of the budget (`reserve` tokens) is set aside for them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lessserve.kernels.reference.evict import EvictionSpec
from lessserve.kernels.reference.kv_quant import bits_of, channel_group
from lessserve.workers.errors import ConfigError

BASES = ("full", "h2o", "lambda")
POLICY_NAMES = ("full", "h2o", "lambda", "h2o+less", "lambda+less", "h2o+", "lambda+",
                "h2o+recall", "lambda+recall", "h2o+less+recall", "lambda+less+recall")


@dataclass(frozen=True)
class Policy:
    base: Literal["full", "h2o", "lambda"]
    less: bool = False
    plus: bool = False  # equal-memory baseline
    recall: bool = False  # evicted history kept off-device and recalled at each turn

    @classmethod
    def parse(cls, name: str) -> Policy:
        name = name.strip().lower()
        if name not in POLICY_NAMES:
            raise ConfigError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
        base, _, extra = name.partition("+")
        mods = extra.split("+")
        return cls(base=base, less="less" in mods, plus=name.endswith("+"),  # type: ignore[arg-type]
                   recall="recall" in mods)

    @property
    def name(self) -> str:
        return self.base + ("+less" if self.less else "+" if self.plus else "") + ("+recall" if self.recall else "")


def token_bytes(head_dim: int, cache_dtype_bytes: int, kv_bits: str = "native") -> int:
    """Slot bytes of one cached token per KV head: key + value (kv_bits 8 / 4: their codes and an fp16
    scale and zero per channel group) + position + score. (A quantised slot's key center, D floats
    per head, is per slot, not per token.)"""
    bits = bits_of(kv_bits)
    groups = head_dim // channel_group(head_dim)
    kv = 2 * head_dim * cache_dtype_bytes if not bits else 2 * (head_dim * bits // 8 + 4 * groups)
    return kv + 4 + 4


def less_state_tokens(rank: int, head_dim: int, cache_dtype_bytes: int, kv_bits: str = "native") -> int:
    """How many cached tokens cost as many bytes as one (H, z) state (fp32) per KV head."""
    state = rank * (head_dim + 1) * 4
    return math.ceil(state / token_bytes(head_dim, cache_dtype_bytes, kv_bits))


def eviction_spec(
    policy: Policy, budget: int, recent: int | None, sink: int, max_context: int, extra_tokens: int = 0,
    reserve: int = 0,
) -> EvictionSpec:
    """`reserve`: entries of the budget set aside for recalled pages (`+recall`): lambda's recent
    window shrinks by it (with nothing recalled, the most recent tokens fill it: lambda as before);
    h2o's heavy-hitter part must hold it."""
    if policy.base == "full":
        return EvictionSpec(mode="full", budget=max_context, recent=max_context, sink=0)
    if budget < 2:
        raise ConfigError(f"budget must be >= 2 tokens, got {budget}")
    b = budget + (extra_tokens if policy.plus else 0)
    if policy.base == "h2o":
        r = b // 2 if recent is None else recent + (b - budget) // 2
        if not 0 < r < b:
            raise ConfigError(f"h2o recent window {r} must be in (0, budget={b})")
        if r + reserve > b:
            raise ConfigError(f"recall pages ({reserve} tokens) do not fit beside h2o's recent window {r} "
                              f"in budget {b}")
        return EvictionSpec(mode="h2o", budget=b, recent=r, sink=0)
    if not 0 < sink < b:
        raise ConfigError(f"lambda sink {sink} must be in (0, budget={b})")
    if sink + reserve >= b:
        raise ConfigError(f"recall pages ({reserve} tokens) and {sink} sink tokens leave no recent window in "
                          f"budget {b}")
    return EvictionSpec(mode="lambda", budget=b, recent=b - sink - reserve, sink=sink)
