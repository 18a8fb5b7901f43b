"""A preallocated slab of fixed-size session slots on the model's device.

Layer-major so one layer of every slot is a plain view for batched kernels:
  k, v   [L, S, Hkv, B, D]  post-RoPE keys / values (model dtype)
  pos    [L, S, Hkv, B]     absolute positions, int32, -1 = empty
  score  [L, S, Hkv, B]     accumulated attention mass (H2O), fp32
  H      [L, S, Hkv, R, D]  LESS numerator state, fp32 (R = 0 without LESS)
  z      [L, S, Hkv, R]     LESS denominator state, fp32
  length [S]                valid entries per slot (equal across layers and heads)
  seen   [S] (host)         tokens the session has consumed = next absolute position

A quantised slab (kv_bits 8 / 4, kernels/reference/kv_quant.py) holds, instead of k and v:
  k_codes, v_codes  [L, S, Hkv, B, Dc]  uint8 codes (Dc = D; 4 bits: two codes a byte, Dc = D / 2)
  k_scale, k_zero,  [L, S, Hkv, B, NG]  fp16 per entry and group of 32 channels (NG = D / 32)
  v_scale, v_zero
  k_center          [L, S, Hkv, D]      fp32 per-channel key center (set by the slot's first chunk)
"""

from __future__ import annotations

import torch

from lessserve.kernels.reference.kv_quant import QuantKV, bits_of, channel_group, code_width
from lessserve.workers.errors import ConfigError, SlotsExhaustedError, SlotStateError

STATE_FIELDS = ("k", "v", "pos", "score", "H", "z")  # a native slab's
QUANT_FIELDS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_center")  # kv_bits 8 / 4


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous host copy of `t` (a strided slot view). Like every slab operation it runs on the
    scheduler thread, inside its torch thread team (workers/threads.py)."""
    return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone(memory_format=torch.contiguous_format)


def fill(t: torch.Tensor, value: int) -> None:
    """t[...] = value in place."""
    t.fill_(value)


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src in place, src on the host with dst's shape and dtype."""
    dst.copy_(src, non_blocking=dst.device.type != "cpu")


class SlotSlab:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_slots: int, capacity: int,
                 rank: int, device: torch.device, dtype: torch.dtype, kv_bits: str = "native"):
        L, S, Hkv, B, D, R = num_layers, num_slots, num_kv_heads, capacity, head_dim, rank
        self.num_slots, self.capacity, self.rank = S, B, R
        self.kv_bits, self.bits, self.dtype, self.device = str(kv_bits), bits_of(kv_bits), dtype, device
        self.fields = (QUANT_FIELDS if self.bits else ("k", "v")) + STATE_FIELDS[2:]
        try:
            if self.bits:
                Dc, NG = code_width(D, self.bits), D // channel_group(D)
                for f in ("k_codes", "v_codes"):
                    setattr(self, f, torch.zeros(L, S, Hkv, B, Dc, dtype=torch.uint8, device=device))
                for f in ("k_scale", "k_zero", "v_scale", "v_zero"):
                    setattr(self, f, torch.zeros(L, S, Hkv, B, NG, dtype=torch.float16, device=device))
                self.k_center = torch.zeros(L, S, Hkv, D, dtype=torch.float32, device=device)
            else:
                self.k = torch.zeros(L, S, Hkv, B, D, dtype=dtype, device=device)
                self.v = torch.zeros(L, S, Hkv, B, D, dtype=dtype, device=device)
            self.pos = torch.full((L, S, Hkv, B), -1, dtype=torch.int32, device=device)
            self.score = torch.zeros(L, S, Hkv, B, dtype=torch.float32, device=device)
            self.H = torch.zeros(L, S, Hkv, R, D, dtype=torch.float32, device=device)
            self.z = torch.zeros(L, S, Hkv, R, dtype=torch.float32, device=device)
        except ValueError as e:
            raise ConfigError(f"kv_bits {kv_bits}: {e}") from e
        except (RuntimeError, torch.OutOfMemoryError) as e:
            raise SlotsExhaustedError(f"cannot allocate {S} slots of {B} tokens on {device}: {e}") from e
        self.length = torch.zeros(S, dtype=torch.int32, device=device)
        self.seen = [0] * S
        self._free = list(range(S - 1, -1, -1))
        self._used: set[int] = set()
        self.histories = None  # workers/history.Histories of a `+recall` engine: follows resets, forks, frees

    # --- allocation -------------------------------------------------------------------------
    def alloc(self) -> int:
        if not self._free:
            raise SlotsExhaustedError(f"all {self.num_slots} session slots are in use")
        slot = self._free.pop()
        self._used.add(slot)
        self.reset(slot)
        return slot

    def free(self, slot: int) -> None:
        self.check(slot)
        self._used.discard(slot)
        self._free.append(slot)
        if self.histories is not None:
            self.histories.reset(slot)

    def check(self, slot: int) -> None:
        if slot not in self._used:
            raise SlotStateError(f"slot {slot} is not allocated")

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def quantised(self) -> bool:
        return self.bits > 0

    def kv(self, layer: int) -> QuantKV:
        """One layer of a quantised slab: the views the kernels take."""
        return QuantKV(*(getattr(self, f)[layer] for f in QUANT_FIELDS), self.bits)

    def reset(self, slot: int) -> None:
        for f in self.fields:
            if f != "pos":
                fill(getattr(self, f)[:, slot], 0)
        fill(self.pos[:, slot], -1)
        self.length[slot] = 0
        self.seen[slot] = 0
        if self.histories is not None:
            self.histories.reset(slot)

    # --- accounting -------------------------------------------------------------------------
    def slot_bytes(self) -> int:
        """Device bytes one slot occupies (constant, whatever the conversation's length): the codes,
        scales, zeros and key center of a quantised slab included."""
        per = sum(getattr(self, f)[:, 0].numel() * getattr(self, f).element_size() for f in self.fields)
        return per + self.length.element_size()

    def total_bytes(self) -> int:
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in self.fields) + \
            self.length.numel() * self.length.element_size()

    def cached_tokens(self, slot: int) -> int:
        return int(self.length[slot])

    # --- moving a slot in and out (offload / restore) ----------------------------------------
    def export(self, slot: int) -> dict[str, torch.Tensor]:
        """A host copy of one slot's state: {field: [L, Hkv, ...]} (self.fields) plus length and seen."""
        self.check(slot)
        out = {f: host_copy(getattr(self, f)[:, slot]) for f in self.fields}
        out["length"] = self.length[slot : slot + 1].to("cpu", copy=True)
        out["seen"] = torch.tensor([self.seen[slot]], dtype=torch.int64)
        return out

    def copy(self, src: int, dst: int) -> None:
        """dst becomes a copy of src (a fork): O(capacity) on the device, whatever src has seen."""
        self.check(src)
        self.check(dst)
        for f in self.fields:
            t = getattr(self, f)
            t[:, dst].copy_(t[:, src])
        self.length[dst] = self.length[src]
        self.seen[dst] = self.seen[src]
        if self.histories is not None:
            self.histories.copy(src, dst)

    def load(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Scatter an exported state into an allocated slot (shapes must match exactly)."""
        self.check(slot)
        for f in self.fields:
            if f not in state:
                raise SlotStateError(f"state has no field {f} (this slab holds kv_bits {self.kv_bits})")
            dst = getattr(self, f)[:, slot]
            src = state[f]
            if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
                raise SlotStateError(f"state field {f}: got {tuple(src.shape)} {src.dtype}, "
                                     f"slot holds {tuple(dst.shape)} {dst.dtype}")
            copy_into(dst, src)
        self.length[slot] = int(state["length"][0])
        self.seen[slot] = int(state["seen"][0])
