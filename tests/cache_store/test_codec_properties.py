"""Property tests of the codec (hypothesis): any slot content round-trips bit for bit, and every
single-byte corruption of an encoded cache is refused with a CodecError (never decoded silently);
format 1 bytes stay readable and are written unchanged; a malformed header is a CodecError."""

from __future__ import annotations

import pytest
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
    h = d.header  # the layout pads to 64 bytes and no more: a reader of another version finds the same offsets
    up = lambda n: -(-n // 64) * 64  # noqa: E731
    head_len = int.from_bytes(bytes(blob[10:14]), "little")
    assert h.payload_start == up(18 + head_len) and h.tensors[0].offset == 0
    for a, b in zip(h.tensors, h.tensors[1:], strict=False):
        assert b.offset == up(a.offset + a.nbytes)
    assert h.payload_bytes == up(h.tensors[-1].offset + h.tensors[-1].nbytes)
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


# --- format 1 on the wire: what older workers wrote must stay readable, and be written the same -----
FORMAT_1 = bytes.fromhex(
    "4c534b564341434801001c0100005654dcdc7b226964656e74697479223a7b226d6f64656c223a226d222c22706f6c696379223a2268326f"
    "2b6c657373222c22627564676574223a31362c226b65726e656c73223a2261626364227d2c2274656e736f7273223a5b7b226e616d65223a"
    "226b222c226474797065223a22666c6f61743332222c227368617065223a5b322c335d2c226f6666736574223a302c226e6279746573223a"
    "32347d2c7b226e616d65223a22706f73222c226474797065223a22696e743332222c227368617065223a5b335d2c226f6666736574223a36"
    "342c226e6279746573223a31327d5d2c227061796c6f61645f6279746573223a3132382c227061796c6f61645f6372633332223a31303230"
    "3631373632352c226d657461223a7b2274223a317d7d000000000000000000000000000000000000000000000000803f0000004000004040"
    "000080400000a040000000000000000000000000000000000000000000000000000000000000000000000000000000000000000001000000"
    "0200000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
)


def golden_state() -> dict[str, torch.Tensor]:
    return {"k": torch.arange(6, dtype=torch.float32).reshape(2, 3), "pos": torch.arange(3, dtype=torch.int32)}


def test_format_1_bytes_are_read_and_written_unchanged():
    d = codec.decode(FORMAT_1, ID)
    assert d.meta == {"t": 1} and codec.read_header(FORMAT_1).payload_start == 320
    for name, t in golden_state().items():
        assert same_bits(d.tensors[name], t), name
    assert bytes(codec.encode(golden_state(), ID, {"t": 1})) == FORMAT_1


def forged(head: bytes, payload: bytes = b"", crc: int | None = None) -> bytes:
    """A buffer whose header checksum is right but whose header JSON is `head` (then `payload`)."""
    import json
    import struct
    import zlib

    if crc is not None:  # keep the payload's size and checksum consistent
        h = json.loads(head)
        h["payload_bytes"], h["payload_crc32"] = len(payload), crc
        head = json.dumps(h).encode()
    fixed = struct.pack("<8sHII", codec.MAGIC, codec.FORMAT_VERSION, len(head), zlib.crc32(head))
    body = fixed + head
    return body + bytes(-len(body) % 64) + payload


@pytest.mark.parametrize("head", [b"{not json", b"[1, 2]", b'{"identity": 3}',
                                  b'{"identity": {"model": "m", "policy": "p", "budget": 1, "kernels": "k"}, '
                                  b'"tensors": 5, "payload_bytes": 0, "payload_crc32": 0, "meta": {}}',
                                  b'{"identity": {"model": "m"}, "tensors": [], "payload_bytes": 0, '
                                  b'"payload_crc32": 0, "meta": {}}',
                                  b"\xff\xfe"])
def test_a_malformed_header_with_a_valid_checksum_is_a_codec_error(head):
    with pytest.raises(CodecError):
        codec.decode(forged(head), ID)


def test_identities_and_headers_are_immutable():
    import dataclasses

    assert hash(ID) == hash(codec.CacheIdentity(**dataclasses.asdict(ID)))
    header = codec.read_header(FORMAT_1)
    for obj, field in ((ID, "budget"), (header, "payload_bytes"), (header.tensors[0], "offset"),
                       (codec.decode(FORMAT_1, ID), "tensors")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, 0)


def test_an_aligned_empty_cache_and_any_memoryview_decode():
    for k in range(64):  # one of these metas makes the header end exactly on a 64-byte boundary
        blob = bytes(codec.encode({}, ID, {"p": "x" * k}))
        if len(blob) == 18 + int.from_bytes(blob[10:14], "little"):
            break
    else:
        raise AssertionError("no aligned header found")
    assert codec.decode(blob, ID).tensors == {}
    assert codec.decode(memoryview(FORMAT_1).cast("I"), ID).meta == {"t": 1}  # a view of 4-byte items


def test_a_tensor_spec_outside_the_payload_is_refused():
    import json
    import zlib

    header = json.loads(FORMAT_1[18:18 + int.from_bytes(FORMAT_1[10:14], "little")])
    payload = FORMAT_1[320:]
    for change in ({"offset": 120}, {"nbytes": 20}, {"offset": -8}, {"offset": -1}, {"shape": [2, 2]}):
        h = json.loads(json.dumps(header))
        h["tensors"][0].update(change)
        with pytest.raises(CodecError):
            codec.decode(forged(json.dumps(h).encode(), payload, zlib.crc32(payload)), ID)


SCALARS = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8)
JSON = st.recursive(SCALARS,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)


def header_fields(h: dict) -> list[tuple]:
    """Every path to a value in a cache header (identity, each tensor spec, sizes, meta)."""
    out = [("identity", k) for k in h["identity"]] + [(k,) for k in ("payload_bytes", "payload_crc32", "meta")]
    out += [("tensors", i, k) for i, spec in enumerate(h["tensors"]) for k in spec]
    out += [("tensors", i, "shape", j) for i, spec in enumerate(h["tensors"]) for j in range(len(spec["shape"]))]
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_value_in_any_header_field_is_a_codec_error_or_a_clean_decode(data):
    """Shapes like [-1, 4] with negative nbytes, float shapes, a string budget: whatever a header
    field holds, decoding ends in a CodecError or a cache whose tensors are exactly what their specs
    say; never another exception, never an allocation from an unchecked size."""
    import json
    import zlib

    header = json.loads(FORMAT_1[18:18 + int.from_bytes(FORMAT_1[10:14], "little")])
    payload = FORMAT_1[320:]
    path = data.draw(st.sampled_from(header_fields(header)))
    value = data.draw(JSON)
    node = header
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    blob = forged(json.dumps(header).encode(), payload, zlib.crc32(payload)) if path[0] != "payload_crc32" else \
        forged(json.dumps(header).encode(), payload)
    try:
        d = codec.decode(blob, ID)
    except CodecError:
        return
    for spec in d.header.tensors:
        t = d.tensors[spec.name]
        assert list(t.shape) == list(spec.shape) and t.numel() * t.element_size() == spec.nbytes
