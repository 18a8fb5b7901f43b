"""The device tier over an Engine's slot slab: sessions' caches in device slots.

`get` exports a slot and encodes it (k/v as int8 + per-token scales when `quantize`), `put`
decodes a cache into a slot (allocating one), `delete` frees the slot. The encoded header meta
carries whatever `meta_fn(sid)` returns (the session's transcript), so a cache always travels
with the exact token ids it consumed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lessserve.cache_store.codec import Blob, CacheIdentity, decode, encode
from lessserve.cache_store.errors import CacheMissError, IncompatibleCacheError, TierFullError
from lessserve.cache_store.tier import DeviceTier, TierStats
from lessserve.kernels import ops
from lessserve.workers.engine import Engine
from lessserve.workers.errors import SlotsExhaustedError, SlotStateError
from lessserve.workers.slots import STATE_FIELDS

QUANTIZED = ("k", "v")


def engine_identity(engine: Engine) -> CacheIdentity:
    return CacheIdentity(model=engine.model_id, policy=engine.policy.name, budget=engine.cfg.budget,
                         less_weights=engine.less_digest)


def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """k, v [L, Hkv, B, D] -> k_q / v_q int8 [L, Hkv, B, D] + k_scale / v_scale fp32 [L, Hkv, B]."""
    out = dict(state)
    for f in QUANTIZED:
        q, scale = ops.quantize_int8(out.pop(f))
        out[f"{f}_q"], out[f"{f}_scale"] = q, scale
    return out


def dequantize_state(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for f in QUANTIZED:
        if f"{f}_q" in out:
            out[f] = ops.dequantize_int8(out.pop(f"{f}_q"), out.pop(f"{f}_scale"), dtype)
    return out


class EngineDeviceTier(DeviceTier):
    def __init__(self, engine: Engine, quantize: bool = False, meta_fn: Callable[[str], dict] | None = None):
        self.engine, self.quantize = engine, quantize
        self.identity = engine_identity(engine)
        self.meta_fn = meta_fn or (lambda sid: {})
        self.slots: dict[str, int] = {}

    # --- slots the worker manages directly --------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.engine.slab.free_slots

    def slot_bytes(self) -> int:
        return self.engine.slab.slot_bytes()

    def slot_of(self, sid: str) -> int:
        try:
            return self.slots[sid]
        except KeyError:
            raise CacheMissError(f"session {sid!r} has no device slot") from None

    def new_slot(self, sid: str) -> int:
        """A fresh, empty slot for `sid` (replacing any it had)."""
        if sid in self.slots:
            self.engine.slab.reset(self.slots[sid])
            return self.slots[sid]
        try:
            slot = self.engine.alloc()
        except SlotsExhaustedError as e:
            raise TierFullError(str(e)) from e
        self.slots[sid] = slot
        return slot

    # --- the tier interface -----------------------------------------------------------------
    def contains(self, sid: str) -> bool:
        return sid in self.slots

    def get(self, sid: str) -> Blob:
        state = self.engine.slab.export(self.slot_of(sid))  # {field: [L, Hkv, ...]}, length [1], seen [1]
        if self.quantize:
            state = quantize_state(state)
        return encode(state, self.identity, self.meta_fn(sid))

    def put(self, sid: str, blob: Blob) -> None:
        tensors = dequantize_state(decode(blob, self.identity).tensors, self.engine.dtype)
        missing = [f for f in (*STATE_FIELDS, "length", "seen") if f not in tensors]
        if missing:
            raise IncompatibleCacheError(f"cache lacks state fields {missing}")
        fresh = sid not in self.slots
        slot = self.new_slot(sid)
        try:
            self.engine.slab.load(slot, tensors)
        except SlotStateError as e:
            if fresh:
                self.engine.free(self.slots.pop(sid))
            raise IncompatibleCacheError(f"cache does not fit this engine's slots: {e}") from e

    def delete(self, sid: str) -> bool:
        slot = self.slots.pop(sid, None)
        if slot is None:
            return False
        self.engine.free(slot)
        return True

    def keys(self) -> list[str]:
        return list(self.slots)

    def stats(self) -> TierStats:
        return TierStats(sessions=len(self.slots), bytes=len(self.slots) * self.slot_bytes())
