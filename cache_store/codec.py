"""Session cache codec: a dict of named tensors <-> bytes behind a versioned, checksummed header.

Layout (little endian):
  fixed   magic b"LSKVCACH" | format version u16 | header length u32 | header crc32 u32
  header  JSON: identity {model, policy, budget, kernels}, tensors [{name, dtype, shape, offset,
          nbytes}], payload_bytes, payload_crc32, meta (free JSON the caller attaches)
  pad     to a multiple of 64 bytes
  payload each tensor's raw bytes at a 64-byte aligned offset

Decoding anything that does not fit (another model / policy / budget / LESS weights, bad magic
or version, a checksum mismatch, a truncated buffer) raises a typed CodecError; a cache is never
restored under a configuration other than the one that wrote it. Quantisation is the caller's
business: it simply encodes int8 tensors and their scales under their own names.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from dataclasses import asdict, dataclass, field

import torch

from lessserve.cache_store.errors import (
    BadMagicError,
    ChecksumError,
    CodecError,
    FormatVersionError,
    IncompatibleCacheError,
    TruncatedError,
)

MAGIC = b"LSKVCACH"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<8sHII")  # magic, version, header length, header crc32
_ALIGN = 64

Blob = bytes | bytearray | memoryview


@dataclass(frozen=True)
class CacheIdentity:
    """What a cache is only valid under: restoring it under anything else is refused."""

    model: str
    policy: str
    budget: int
    less_weights: str  # content digest of the LESS weights ("none" without LESS)

    def to_wire(self) -> dict:
        """Header JSON; the digest keeps its format-1 key, "kernels"."""
        return {"model": self.model, "policy": self.policy, "budget": self.budget, "kernels": self.less_weights}

    @classmethod
    def from_wire(cls, d: dict) -> CacheIdentity:
        return cls(model=d["model"], policy=d["policy"], budget=d["budget"], less_weights=d["kernels"])


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name without the "torch." prefix
    shape: tuple[int, ...]
    offset: int  # from the start of the payload
    nbytes: int


@dataclass(frozen=True)
class Header:
    identity: CacheIdentity
    tensors: tuple[TensorSpec, ...]
    payload_bytes: int
    payload_crc32: int
    meta: dict = field(default_factory=dict)
    payload_start: int = 0  # offset of the payload in the encoded buffer


@dataclass(frozen=True)
class Decoded:
    header: Header
    tensors: dict[str, torch.Tensor]  # read-only views of the buffer: copy before writing

    @property
    def meta(self) -> dict:
        return self.header.meta


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CodecError(f"unknown dtype {name!r} in cache header")
    return dt


def _raw(t: torch.Tensor) -> torch.Tensor:
    """Any tensor -> its bytes as a flat uint8 CPU tensor (no copy when already contiguous on CPU)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def encode(tensors: dict[str, torch.Tensor], identity: CacheIdentity, meta: dict | None = None) -> bytearray:
    """Named tensors -> one buffer (header + payload). `meta` must be JSON-serialisable."""
    specs, raws, off = [], [], 0
    for name, t in tensors.items():
        r = _raw(t)
        specs.append(TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), off, r.numel()))
        raws.append(r)
        off = _align(off + r.numel())
    payload_bytes = off
    out = bytearray(payload_bytes)  # grown below by the prefix; payload written first for its crc
    mv = memoryview(out)
    for s, r in zip(specs, raws, strict=True):
        if s.nbytes:
            mv[s.offset : s.offset + s.nbytes] = r.numpy().data
    crc = zlib.crc32(mv)
    mv.release()
    head = json.dumps({
        "identity": identity.to_wire(),
        "tensors": [asdict(s) for s in specs],
        "payload_bytes": payload_bytes,
        "payload_crc32": crc,
        "meta": meta or {},
    }, separators=(",", ":")).encode()
    prefix_len = _align(_FIXED.size + len(head))
    prefix = bytearray(prefix_len)
    _FIXED.pack_into(prefix, 0, MAGIC, FORMAT_VERSION, len(head), zlib.crc32(head))
    prefix[_FIXED.size : _FIXED.size + len(head)] = head
    out[0:0] = prefix  # one memmove of the payload
    return out


def _checked(v, kind: type, what: str):
    if not isinstance(v, kind) or isinstance(v, bool):
        raise ValueError(f"{what} is {type(v).__name__}, not {kind.__name__}")
    return v


def _count(v, what: str) -> int:
    """A non-negative int (JSON true/false and floats are not counts)."""
    if _checked(v, int, what) < 0:
        raise ValueError(f"{what} is negative: {v}")
    return v


def _spec(s) -> TensorSpec:
    """One tensor's spec, every field range-checked before anything is allocated from it."""
    shape = tuple(_count(d, "a dimension") for d in _checked(s["shape"], list, "shape"))
    spec = TensorSpec(_checked(s["name"], str, "name"), _checked(s["dtype"], str, "dtype"), shape,
                      _count(s["offset"], "offset"), _count(s["nbytes"], "nbytes"))
    numel = 1
    for d in shape:
        numel *= d
    if numel * _dtype(spec.dtype).itemsize != spec.nbytes:
        raise ValueError(f"tensor {spec.name!r}: shape {list(shape)} of {spec.dtype} is not {spec.nbytes} bytes")
    return spec


def read_header(buf: Blob) -> Header:
    """Parse and check the header (magic, version, header checksum, total length); no payload check."""
    mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
    if len(mv) < _FIXED.size:
        raise TruncatedError(f"{len(mv)} bytes: shorter than the {_FIXED.size}-byte fixed header")
    magic, version, head_len, head_crc = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise BadMagicError(f"bad magic {bytes(magic)!r}: not an encoded session cache")
    if version != FORMAT_VERSION:
        raise FormatVersionError(f"cache format version {version}; this code reads version {FORMAT_VERSION}")
    if len(mv) < _FIXED.size + head_len:
        raise TruncatedError(f"{len(mv)} bytes: header says {head_len} header bytes follow")
    head = mv[_FIXED.size : _FIXED.size + head_len]
    if zlib.crc32(head) != head_crc:
        raise ChecksumError("header checksum mismatch: the cache header is corrupted")
    try:
        h = json.loads(bytes(head))
        idw = h["identity"]
        ident = CacheIdentity(model=_checked(idw["model"], str, "model"),
                              policy=_checked(idw["policy"], str, "policy"), budget=_count(idw["budget"], "budget"),
                              less_weights=_checked(idw["kernels"], str, "kernels"))
        specs = tuple(_spec(s) for s in _checked(h["tensors"], list, "tensors"))
        header = Header(ident, specs, _count(h["payload_bytes"], "payload_bytes"),
                        _count(h["payload_crc32"], "payload_crc32"), _checked(h["meta"], dict, "meta"),
                        _align(_FIXED.size + head_len))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CodecError(f"malformed cache header: {type(e).__name__}: {e}") from e
    if any(mv[_FIXED.size + head_len : header.payload_start]):  # the alignment padding is no checksum's: zeros only
        raise ChecksumError("non-zero bytes in the header padding: the cache header is corrupted")
    expected = header.payload_start + header.payload_bytes
    if len(mv) != expected:
        raise TruncatedError(f"{len(mv)} bytes; the header says {expected}")
    return header


def check_identity(got: CacheIdentity, expect: CacheIdentity) -> None:
    diff = [f"{k}: cache {getattr(got, k)!r} != {getattr(expect, k)!r}"
            for k in ("model", "policy", "budget", "less_weights") if getattr(got, k) != getattr(expect, k)]
    if diff:
        raise IncompatibleCacheError("cache written under another configuration (" + "; ".join(diff) + ")")


def decode(buf: Blob, expect: CacheIdentity) -> Decoded:
    """Buffer -> named tensors, after checking identity, lengths and the payload checksum."""
    header = read_header(buf)
    check_identity(header.identity, expect)
    mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
    payload = mv[header.payload_start :]
    if zlib.crc32(payload) != header.payload_crc32:
        raise ChecksumError("payload checksum mismatch: the cache bytes are corrupted")
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():  # read-only buffers (bytes) are fine: callers copy out
        warnings.simplefilter("ignore", UserWarning)
        for s in header.tensors:
            numel = 1
            for d in s.shape:
                numel *= d
            dt = _dtype(s.dtype)
            if s.offset < 0 or s.offset + s.nbytes > header.payload_bytes or numel * dt.itemsize != s.nbytes:
                raise CodecError(f"tensor {s.name!r}: spec {s} does not fit the payload")
            if s.nbytes == 0:
                tensors[s.name] = torch.empty(s.shape, dtype=dt)
                continue
            raw = torch.frombuffer(payload, dtype=torch.uint8, count=s.nbytes, offset=s.offset)
            tensors[s.name] = raw.view(dt).reshape(s.shape)
    return Decoded(header, tensors)
