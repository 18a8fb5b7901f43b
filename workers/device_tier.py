"""The device tier over an Engine's slot slab: sessions' caches in device slots.

One slot wire format: a slot travels as its packed record (kernels/reference/pack.py, one
contiguous uint8 buffer per slot, k/v as int8 + per-token scales when `quantize`; the fused
Triton pack on CUDA), wrapped in the codec's checked envelope (cache_store/codec.py) as the tensor
"slot", with {"quant", "dtype", "seen"} under meta["slot"]. `get` packs a slot, `put` unpacks a
record into a slot (allocating one), `delete` frees the slot. The header meta also carries whatever
`meta_fn(sid)` returns (the session's transcript), so a cache always travels with the exact token
ids it consumed. A `+recall` engine's session also carries its history (workers/history.py) as the
tensors "history_k" / "history_v" with {"base", "n", "page", "recalled"} under meta["history"], so
the history goes wherever the slot goes (host, Redis, another worker); a cache without one restores
with an empty history (that session recalls nothing older than its restore). A cache in any other
layout (older releases wrote named tensors) is an IncompatibleCacheError: the store rebuilds that
session from its transcript.

A quantised slab's slot (kv_bits 8 / 4) travels as it is: its codes, scales, zeros and key center, no
second quantisation whatever `quantize` says (same bytes in, same bytes out), with meta["slot"]
["kv_bits"] naming its layout. A record without it is native; a record whose kv_bits is not this
engine's is an IncompatibleCacheError, so an older (native) record never reaches a quantised slot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lessserve.cache_store.codec import Blob, CacheIdentity, decode, encode
from lessserve.cache_store.errors import CacheMissError, IncompatibleCacheError, TierFullError
from lessserve.cache_store.tier import DeviceTier, TierStats
from lessserve.kernels import ops
from lessserve.kernels.errors import PackError
from lessserve.kernels.reference.pack import QUANT_MODES, PackLayout, section_view
from lessserve.workers.engine import Engine
from lessserve.workers.errors import SlotsExhaustedError
from lessserve.workers.history import HISTORY_FIELDS, History
from lessserve.workers.slots import SlotSlab

SLOT = "slot"  # the codec tensor holding the packed record
HISTORY = "history"  # meta key of a +recall session's history
log = logging.getLogger(__name__)


def engine_identity(engine: Engine) -> CacheIdentity:
    return CacheIdentity(model=engine.model_id, policy=engine.policy.name, budget=engine.cfg.budget,
                         less_weights=engine.less_digest)


def slab_fields(slab: SlotSlab) -> tuple[torch.Tensor, ...]:
    """A native slab's tensors in pack / unpack order: k, v, pos, score, H, z, length."""
    return slab.k, slab.v, slab.pos, slab.score, slab.H, slab.z, slab.length


def layout_of(slab: SlotSlab, quant: str) -> PackLayout:
    """The record layout of this slab's slots (`quant` applies to native slabs only)."""
    if slab.quantised:
        return PackLayout.of_quantised(slab.k_codes, slab.k_center, slab.H, slab.kv_bits, slab.dtype)
    return PackLayout.of(slab.k, slab.H, quant)


def quant_fields(slab: SlotSlab) -> dict[str, torch.Tensor]:
    """A quantised slab's record sections: {name: [L, S, ...]}."""
    return {f: getattr(slab, f) for f in slab.fields}


def checked_record(tensors: dict[str, torch.Tensor], meta: dict, slab: SlotSlab) -> tuple[torch.Tensor, str, int]:
    """(record uint8 [record_bytes], quant, seen) of a decoded cache, after checking that it is one
    record of this slab's layout whose length fits the slot (IncompatibleCacheError otherwise)."""
    info, record = meta.get(SLOT), tensors.get(SLOT)
    if record is None or not isinstance(info, dict):
        raise IncompatibleCacheError("the cache is not a packed slot record (an older release's layout)")
    quant, dtype, seen = info.get("quant"), info.get("dtype"), info.get("seen")
    kv_bits = info.get("kv_bits", "native")  # records before quantised slots carry none: native
    if quant not in QUANT_MODES or not isinstance(seen, int) or isinstance(seen, bool) or seen < 0:
        raise IncompatibleCacheError(f"bad slot record description {info!r}")
    if kv_bits != slab.kv_bits:
        raise IncompatibleCacheError(f"slot record of kv_bits {kv_bits}; this engine's slots hold kv_bits "
                                     f"{slab.kv_bits}")
    if slab.quantised and quant != "none":
        raise IncompatibleCacheError(f"a kv_bits {kv_bits} slot record with quant {quant!r}")
    if not slab.quantised and quant == "none" and dtype != str(slab.k.dtype).removeprefix("torch."):
        raise IncompatibleCacheError(f"slot record of {dtype} k/v; this engine's slots hold {slab.k.dtype}")
    layout = layout_of(slab, quant)
    if record.dtype != torch.uint8 or tuple(record.shape) != (layout.record_bytes,):
        raise IncompatibleCacheError(f"slot record of {tuple(record.shape)} {record.dtype}; this engine's "
                                     f"slots pack to uint8 ({layout.record_bytes},)")
    length = int(section_view(record[None], layout, "length")[0, 0])
    if not 0 <= length <= min(layout.B, seen):
        raise IncompatibleCacheError(f"slot record holds {length} entries of {layout.B} after {seen} tokens")
    return record, quant, seen


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

    @property
    def quant(self) -> str:
        """int8 offload of a native slab's k / v; a quantised slab's slot travels as it is."""
        return "int8" if self.quantize and not self.engine.slab.quantised else "none"

    def get(self, sid: str) -> Blob:
        slab, slot = self.engine.slab, self.slot_of(sid)
        ids = torch.tensor([slot], dtype=torch.long, device=slab.device)
        if slab.quantised:  # codes, scales, zeros and key center as they are
            record = ops.pack_fields(quant_fields(slab), slab.length, ids, layout_of(slab, "none"))[0]
        else:
            record = ops.pack_slots(*slab_fields(slab), ids, self.quant)[0]  # uint8 [record_bytes], one pass
        info = {"quant": self.quant, "dtype": str(slab.dtype).removeprefix("torch."), "seen": slab.seen[slot]}
        if slab.quantised:
            info["kv_bits"] = slab.kv_bits
        tensors, meta = {SLOT: record}, {**self.meta_fn(sid), SLOT: info}
        hist = self.engine.histories
        if hist is not None and slot in hist.by_slot:
            t, meta[HISTORY] = hist.by_slot[slot].export()
            tensors.update(t)
        return encode(tensors, self.identity, meta)

    def put(self, sid: str, blob: Blob) -> None:
        slab = self.engine.slab
        cache = decode(blob, self.identity)
        record, quant, seen = checked_record(cache.tensors, cache.meta, slab)
        fresh = sid not in self.slots
        slot = self.new_slot(sid)
        try:
            if slab.quantised:
                ops.unpack_fields(record, quant_fields(slab), slab.length, slot, layout_of(slab, quant))
            else:
                ops.unpack_slot(record.to(slab.device), *slab_fields(slab), slot, quant)
        except PackError as e:
            slab.reset(slot)
            if fresh:
                self.engine.free(self.slots.pop(sid))
            raise IncompatibleCacheError(f"cache does not fit this engine's slots: {e}") from e
        slab.seen[slot] = seen
        hist = self.engine.histories
        if hist is not None and HISTORY in cache.meta and all(f in cache.tensors for f in HISTORY_FIELDS):
            try:
                h = History.restore(hist.shape, hist.dtype, cache.tensors, cache.meta[HISTORY])
            except (ValueError, TypeError) as e:  # the slot is good: the session goes on without recall
                log.warning("session %s: history not restored (%s); it recalls nothing older", sid, e)
            else:
                if h.n == seen:
                    hist.put(slot, h)

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
