"""Random inputs for the kernel tests, drawn from torch's global generator, which conftest.py seeds
per test from its id (the seed is in the failure report)."""

from __future__ import annotations

import torch

from lessserve.kernels.reference.lowrank import LessLayerWeights


def slab_layer(S: int, Hkv: int, B: int, D: int, dtype, device):
    k = torch.randn(S, Hkv, B, D, device=device).to(dtype)
    v = torch.randn(S, Hkv, B, D, device=device).to(dtype)
    return k, v


def slots(S: int, lens: list[int], B: int, device):
    """length [S] int32 with the chosen slots (a random subset, random order) at `lens`."""
    n = len(lens)
    length = torch.randint(0, B + 1, (S,), dtype=torch.int32, device=device)
    slot_ids = torch.randperm(S, device=device)[:n]
    length[slot_ids] = torch.tensor(lens, dtype=torch.int32, device=device)
    return length, slot_ids


def less_state(S: int, Hkv: int, R: int, D: int, device):
    H = torch.rand(S, Hkv, R, D, device=device) * 3
    z = torch.rand(S, Hkv, R, device=device) * 5
    return H, z


def less_weights(Hq: int, Hkv: int, D: int, R: int, device, hidden: int = 16) -> LessLayerWeights:
    r = lambda *s, fan: torch.randn(*s, device=device) / fan**0.5  # noqa: E731
    return LessLayerWeights(
        w1q=r(Hq, D, hidden, fan=D), w2q=r(Hq, hidden, R, fan=hidden),
        w1k=r(Hkv, D, hidden, fan=D), w2k=r(Hkv, hidden, R, fan=hidden), wint=r(Hkv, R, R, fan=R),
        s1=torch.ones(Hkv, R, device=device), s2=torch.ones(Hkv, R, device=device))


# Evict cases shared by the Triton and fast-path tests: (Hkv, C, D, B, R, dtype, lens, mode, recent, sink)
EVICT = [
    (2, 1, 64, 17, 8, torch.float32, [17], "h2o", 8, 0),
    (3, 1, 128, 97, 4, torch.float16, [97, 1, 96, 97, 50], "h2o", 40, 0),
    (1, 16, 64, 97, 8, torch.bfloat16, [97, 17, 90, 0, 85], "lambda", 93, 4),
    (4, 37, 128, 613, 0, torch.float32, [613], "h2o", 300, 0),
    (2, 7, 64, 64, 0, torch.float16, [1, 17, 50, 57, 30], "full", 64, 0),
    (8, 16, 64, 32, 8, torch.float32, [32], "lambda", 28, 4),
    (1, 97, 128, 17, 8, torch.float32, [17, 3], "h2o", 8, 0),
]


def quant_layer(S: int, Hkv: int, B: int, D: int, bits: int, length: torch.Tensor, device):
    """One layer of a quantised slab (kernels/reference/kv_quant.py) holding random keys with an
    outlier channel and an offset, and random values; rows past each slot's length hold finite
    garbage codes, scales and zeros (what a slab keeps there), never to be counted."""
    from lessserve.kernels.reference.kv_quant import QuantKV, key_center, quantize_rows

    k = torch.randn(S, Hkv, B, D, device=device) + torch.randn(D, device=device)
    k[..., 1] *= 12  # KIVI's observation: a few key channels are much larger than the rest
    v = torch.randn(S, Hkv, B, D, device=device)
    kc = key_center(k[:, :, : max(1, B // 3)])
    kq, ks, kz = quantize_rows(k, bits, kc)
    vq, vs, vz = quantize_rows(v, bits)
    tail = torch.arange(B, device=device)[None, None, :] >= length.to(device)[:, None, None]  # [S, 1, B]
    tail = tail.expand(S, Hkv, B)
    for codes in (kq, vq):
        codes[tail] = torch.randint(0, 256, codes[tail].shape, device=device).to(torch.uint8)
    for params in (ks, kz, vs, vz):
        params[tail] = (torch.rand(params[tail].shape, device=device) * 50).half()
    return QuantKV(kq, ks, kz, vq, vs, vz, kc, bits)
