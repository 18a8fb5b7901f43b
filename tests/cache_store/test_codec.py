"""The codec: exact round trips, and every kind of bad buffer refused with a typed error."""

from __future__ import annotations

import struct

import pytest
import torch

from lessserve.cache_store import codec
from lessserve.cache_store.errors import (
    BadMagicError,
    ChecksumError,
    CodecError,
    FormatVersionError,
    IncompatibleCacheError,
    TruncatedError,
)
from lessserve.workers.device_tier import EngineDeviceTier

ID = codec.CacheIdentity(model="m", policy="h2o", budget=64, less_weights="none")


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "k": torch.randn(3, 2, 17, 16, generator=g),
        "b": torch.randn(1, 97, generator=g).bfloat16(),
        "h": torch.randn(613, generator=g).half(),
        "q": torch.randint(-127, 128, (5, 7), generator=g, dtype=torch.int8),
        "pos": torch.arange(13, dtype=torch.int32),
        "seen": torch.tensor([12345678901], dtype=torch.int64),
        "empty": torch.zeros(2, 0, 3),
    }


def test_round_trip_exact_all_dtypes():
    t = sample()
    blob = codec.encode(t, ID, {"transcript": {"ids": [1, 2, 3]}})
    for buf in (blob, bytes(blob), memoryview(bytes(blob))):
        d = codec.decode(buf, ID)
        assert d.meta == {"transcript": {"ids": [1, 2, 3]}}
        assert list(d.tensors) == list(t)
        for k in t:
            assert d.tensors[k].dtype == t[k].dtype and d.tensors[k].shape == t[k].shape
            assert torch.equal(d.tensors[k], t[k]), k


def test_header_records_identity_dtypes_shapes_checksum():
    h = codec.read_header(codec.encode(sample(), ID))
    assert h.identity == ID
    spec = {s.name: s for s in h.tensors}
    assert spec["b"].dtype == "bfloat16" and spec["k"].shape == (3, 2, 17, 16)
    assert h.payload_crc32 and h.payload_bytes >= sum(s.nbytes for s in h.tensors)


@pytest.mark.parametrize("where", ["payload_first", "payload_middle", "payload_last", "header"])
def test_flipped_bytes_are_detected(where):
    blob = bytearray(codec.encode(sample(), ID))
    start = codec.read_header(blob).payload_start
    i = {"payload_first": start, "payload_middle": (start + len(blob)) // 2, "payload_last": len(blob) - 1,
         "header": 30}[where]
    if where == "payload_last":  # the last bytes may be alignment padding: flip the last tensor byte
        h = codec.read_header(blob)
        s = max((s for s in h.tensors if s.nbytes), key=lambda s: s.offset)
        i = start + s.offset + s.nbytes - 1
    blob[i] ^= 0x40
    with pytest.raises(ChecksumError):
        codec.decode(bytes(blob), ID)


@pytest.mark.parametrize("cut", [0, 5, 20, 200, -1, -4096])
def test_truncated_is_refused(cut):
    blob = bytes(codec.encode(sample(), ID))
    with pytest.raises(TruncatedError):
        codec.decode(blob[:cut], ID)
    with pytest.raises(TruncatedError):
        codec.decode(blob + b"\0", ID)


def test_bad_magic_and_version():
    blob = bytearray(codec.encode(sample(), ID))
    bad = bytearray(blob)
    bad[0:8] = b"NOTACACH"
    with pytest.raises(BadMagicError):
        codec.decode(bytes(bad), ID)
    bad = bytearray(blob)
    struct.pack_into("<H", bad, 8, codec.FORMAT_VERSION + 1)
    with pytest.raises(FormatVersionError):
        codec.decode(bytes(bad), ID)
    assert issubclass(FormatVersionError, CodecError) and issubclass(BadMagicError, CodecError)


@pytest.mark.parametrize("field,value", [("model", "other-model"), ("policy", "lambda"), ("budget", 128),
                                         ("less_weights", "0123abcd")])
def test_other_configuration_is_refused(field, value):
    blob = codec.encode(sample(), ID)
    other = codec.CacheIdentity(**{**ID.__dict__, field: value})
    with pytest.raises(IncompatibleCacheError, match=field):
        codec.decode(blob, other)


def test_device_tier_refuses_a_cache_from_another_budget(tiny_engine_factory):
    a = EngineDeviceTier(tiny_engine_factory(budget=16))
    b = EngineDeviceTier(tiny_engine_factory(budget=24))
    slot = a.new_slot("s")
    a.engine.prefill(slot, [1, 2, 3, 4, 5])
    blob = a.get("s")
    with pytest.raises(IncompatibleCacheError, match="budget"):
        b.put("s", blob)
    assert not b.contains("s") and b.free_slots == b.engine.cfg.max_slots


def test_quantized_device_tier_is_smaller_and_close(tiny_engine_factory):
    e = tiny_engine_factory()
    tier = EngineDeviceTier(e)
    slot = tier.new_slot("s")
    e.prefill(slot, list(range(1, 30)))
    before = e.slab.export(slot)
    full = tier.get("s")
    tier.quantize = True
    small = tier.get("s")
    assert len(small) < 0.6 * len(full)
    header = codec.read_header(small)
    assert [s.name for s in header.tensors] == ["slot"] and header.tensors[0].dtype == "uint8"
    assert header.meta["slot"] == {"quant": "int8", "dtype": "float32", "seen": 29}
    tier.delete("s")
    tier.quantize = False
    tier.put("s", small)  # dequantised on load whatever the loading tier's own setting
    after = e.slab.export(tier.slot_of("s"))
    for f in ("k", "v"):
        tol = before[f].abs().amax(dim=-1, keepdim=True) / 127 / 2 + 1e-6
        assert ((after[f] - before[f]).abs() <= tol).all()
    for f in ("pos", "score", "length", "seen"):
        assert torch.equal(after[f], before[f])

