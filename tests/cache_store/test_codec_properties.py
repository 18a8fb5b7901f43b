"""Property tests of the codec (hypothesis): any slot content round-trips bit for bit, and every
single-byte corruption of an encoded cache is refused with a CodecError (never decoded silently)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lessserve.cache_store import codec
from lessserve.cache_store.errors import CodecError

ID = codec.CacheIdentity(model="m", policy="h2o+less", budget=16, less_weights="abcd")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int32, torch.int64, torch.uint8]
PROPS = settings(max_examples=60, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def slot_states(draw) -> dict[str, torch.Tensor]:
    """A slot-like dict: k, v, pos, score, H, z, length, seen (any shapes, dtypes, bytes), maybe
    int8 codes and scales, maybe empty tensors."""
    L, Hkv, B = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 9))
    D, R = draw(st.sampled_from([1, 4, 16])), draw(st.integers(0, 4))
    kv = draw(st.sampled_from(DTYPES[:3]))
    shapes = {"k": ((L, Hkv, B, D), kv), "v": ((L, Hkv, B, D), kv), "pos": ((L, Hkv, B), torch.int32),
              "score": ((L, Hkv, B), torch.float32), "H": ((L, Hkv, R, D), torch.float32),
              "z": ((L, Hkv, R), torch.float32), "length": ((1,), torch.int32), "seen": ((1,), torch.int64)}
    if draw(st.booleans()):  # an int8 offload's fields
        shapes |= {"k_q": ((L, Hkv, B, D), torch.int8), "k_scale": ((L, Hkv, B), torch.float32)}
    out = {}
    for name, (shape, dt) in shapes.items():
        n = dt.itemsize
        for s in shape:
            n *= s
        raw = draw(st.binary(min_size=n, max_size=n))  # any bytes: NaNs, infinities, -0.0 included
        out[name] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(shape) if n else \
            torch.empty(shape, dtype=dt)
    return out


metas = st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=20),
                                                      st.lists(st.integers(0, 50_000), max_size=30)), max_size=4)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.contiguous().view(torch.uint8).reshape(-1)
                                                              .numpy()) == bytes(b.contiguous().view(torch.uint8)
                                                                                 .reshape(-1).numpy())


@PROPS
@given(state=slot_states(), meta=metas)
def test_any_slot_content_round_trips_bit_for_bit(state, meta):
    blob = codec.encode(state, ID, {"transcript": meta})
    d = codec.decode(bytes(blob), ID)
    assert d.meta == {"transcript": meta} and list(d.tensors) == list(state)
    for name, t in state.items():
        assert same_bits(d.tensors[name], t), name


@PROPS
@given(state=slot_states(), data=st.data())
def test_every_single_byte_corruption_is_refused(state, data):
    blob = bytes(codec.encode(state, ID, {"transcript": {"ids": [1, 2, 3]}}))
    i = data.draw(st.integers(0, len(blob) - 1), label="byte")
    flip = data.draw(st.integers(1, 255), label="xor")
    bad = bytearray(blob)
    bad[i] ^= flip
    try:
        codec.decode(bytes(bad), ID)
    except CodecError:
        return
    raise AssertionError(f"byte {i} of {len(blob)} xor {flip:#x} decoded without an error")


def test_every_byte_of_one_cache_is_covered():
    """Exhaustively, for one small cache: each position, one flip, is refused (header, padding, payload)."""
    state = {"k": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4), "pos": torch.arange(5, dtype=torch.int32)}
    blob = bytes(codec.encode(state, ID, {"transcript": {"ids": [7]}}))
    accepted = []
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        try:
            codec.decode(bytes(bad), ID)
            accepted.append(i)
        except CodecError:
            pass
    assert not accepted, f"corruptions at bytes {accepted} decoded silently"
