"""One slot wire format: the device tier moves a slot as its packed record (kernels/reference/pack.py)
inside the codec's envelope; a record that does not describe one of this engine's slots, or a cache
in an older layout, is refused as incompatible before anything reaches a slot."""

from __future__ import annotations

import pytest
import torch

from lessserve.cache_store import codec
from lessserve.cache_store.errors import IncompatibleCacheError
from lessserve.kernels.reference.pack import PackLayout, pack_slots_ref, section_view
from lessserve.workers.device_tier import EngineDeviceTier, engine_identity, slab_fields
from tests.workers.replay import FIELDS, assert_same_state, int8_round_trip


def filled(tier: EngineDeviceTier, sid: str, n: int) -> int:
    slot = tier.new_slot(sid)
    tier.engine.prefill(slot, list(range(1, n + 1)))
    return slot


@pytest.mark.parametrize("quantize", [False, True])
def test_a_slot_travels_as_its_packed_record(tiny_engine_factory, quantize):
    tier = EngineDeviceTier(tiny_engine_factory(), quantize=quantize)
    slab = tier.engine.slab
    slot = filled(tier, "s", 37)
    before = slab.export(slot)
    blob = tier.get("s")
    d = codec.decode(blob, tier.identity)
    quant = "int8" if quantize else "none"
    want = pack_slots_ref(*slab_fields(slab), torch.tensor([slot]), quant)[0]  # the reference's record
    assert torch.equal(d.tensors["slot"], want)
    other = EngineDeviceTier(tiny_engine_factory())  # another worker, whatever its own quantize setting
    other.put("s", blob)
    after = other.engine.slab.export(other.slot_of("s"))
    assert_same_state(after, int8_round_trip(before) if quantize else before, "restored slot")
    if not quantize:  # same bytes in, same bytes out
        assert bytes(other.get("s")) == bytes(blob)


def forge(tier: EngineDeviceTier, blob, *, record=None, info=None) -> bytes:
    d = codec.decode(blob, tier.identity)
    meta = {**d.meta, "slot": info if info is not None else d.meta["slot"]}
    return bytes(codec.encode({"slot": record if record is not None else d.tensors["slot"].clone()}, tier.identity,
                              meta))


def test_records_that_do_not_fit_the_slot_are_refused_before_any_slot_is_touched(tiny_engine_factory):
    tier = EngineDeviceTier(tiny_engine_factory())
    slab = tier.engine.slab
    filled(tier, "s", 20)
    blob = tier.get("s")
    layout = PackLayout.of(slab.k, slab.H, "none")
    rec = codec.decode(blob, tier.identity).tensors["slot"].clone()
    too_long = rec.clone()
    section_view(too_long[None], layout, "length")[0, 0] = layout.B + 1
    info = codec.decode(blob, tier.identity).meta["slot"]
    bad = [forge(tier, blob, record=too_long),  # more entries than a slot holds
           forge(tier, blob, record=rec[:-16]),  # a truncated record (its own checksum is right)
           forge(tier, blob, info={**info, "seen": 3}),  # more entries than tokens seen
           forge(tier, blob, info={**info, "seen": -1}),
           forge(tier, blob, info={**info, "quant": "int4"}),
           forge(tier, blob, info={**info, "dtype": "bfloat16"}),  # k/v of another dtype, same record size?
           forge(tier, blob, info="x")]
    free = slab.free_slots
    for i, b in enumerate(bad):
        with pytest.raises(IncompatibleCacheError):
            tier.put(f"t{i}", b)
        assert not tier.contains(f"t{i}") and slab.free_slots == free, i


def test_a_cache_in_the_older_named_tensor_layout_is_incompatible(tiny_engine_factory):
    e = tiny_engine_factory()
    tier = EngineDeviceTier(e)
    state = e.slab.export(filled(tier, "s", 12))
    old = bytes(codec.encode({f: state[f] for f in FIELDS}, engine_identity(e), {"transcript": {}}))
    with pytest.raises(IncompatibleCacheError, match="older release"):
        tier.put("s2", old)
    assert not tier.contains("s2")
