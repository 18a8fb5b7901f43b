"""Sessions' histories for `+recall`: every token a session consumed, its post-RoPE K/V per layer
and KV head, on the host, in pages the recall round (kernels/reference/recall.py) scores and
brings back into the slot at each new turn.

A History is append-only from position `base` (a multiple of the page size) to `n` (the tokens
the session consumed, = the slot's `seen`); pages before `base` were dropped under host pressure
and can no longer come back (their tokens stay folded into the LESS state, as plain eviction
leaves them). Storage grows by doubling, so appending a decode token is a copy, not a
reallocation. Pages carry no summary: the recall round scores every history key exactly (per-page
key summaries chose worse on dev: docs/recall.md).

Histories is the engine's pool, one History per slot in use: forks copy it, a reset or a freed slot
drops it, and when the pool holds more than `max_bytes` the oldest pages of the least recently used
sessions go first (down to none: that session degrades to plain eviction, never to an error).
"""

from __future__ import annotations

import itertools

import torch

HISTORY_FIELDS = ("history_k", "history_v")  # the codec tensors a session's history travels as
RESTORE_SPARE = 512  # tokens of room a restored history gets beyond what it holds (at least a quarter more)


class History:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, page: int):
        self.shape, self.dtype, self.page = (num_layers, num_kv_heads, head_dim), dtype, page
        L, Hkv, D = self.shape
        self.k = torch.empty(L, Hkv, 0, D, dtype=dtype)  # [L, Hkv, capacity, D] position base + t at t
        self.v = torch.empty(L, Hkv, 0, D, dtype=dtype)
        self.base = 0  # first position held
        self.n = 0  # tokens consumed: positions [base, n) are held
        self.recalled = 0  # tokens brought back into the slot so far
        self.queries: torch.Tensor | None = None  # [L, Hq, Q, D] the latest step's last queries (choose pages)
        self.last_used = 0  # the pool's clock at the latest step

    # --- size ------------------------------------------------------------------------------
    @property
    def held(self) -> int:
        return self.n - self.base

    @property
    def pages(self) -> int:
        """Full pages held."""
        return self.held // self.page

    def nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()

    def keys(self, layer: int) -> torch.Tensor:
        return self.k[layer, :, : self.held]  # [Hkv, held, D]

    def values(self, layer: int) -> torch.Tensor:
        return self.v[layer, :, : self.held]

    def keep_queries(self, layer: int, q: torch.Tensor) -> None:
        """q [Hq, Q, D]: one layer's last queries of the step in progress (the next recall round's)."""
        if self.queries is None or self.queries.shape[2] != q.shape[1]:
            self.queries = torch.zeros(self.shape[0], q.shape[0], q.shape[1], q.shape[2], dtype=q.dtype,
                                       device=q.device)
        self.queries[layer] = q

    # --- appending -------------------------------------------------------------------------
    def reserve(self, count: int) -> None:
        """Room for `count` more tokens (capacity doubles)."""
        need = self.held + count
        if need <= self.k.shape[2]:
            return
        cap = max(need, 2 * self.k.shape[2], 64)
        for f in ("k", "v"):
            old = getattr(self, f)
            new = torch.empty(*old.shape[:2], cap, old.shape[3], dtype=self.dtype)
            new[:, :, : self.held] = old[:, :, : self.held]
            setattr(self, f, new)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k / v [Hkv, C, D] of positions start .. start + C - 1 at one layer (reserved before)."""
        a = start - self.base
        self.k[layer, :, a : a + k.shape[1]] = k
        self.v[layer, :, a : a + v.shape[1]] = v

    def advance(self, count: int) -> None:
        """`count` tokens were written at every layer: they are held now."""
        self.n += count

    # --- dropping, copying, travelling -----------------------------------------------------
    def drop_pages(self, count: int) -> None:
        """Forget the `count` oldest full pages (their memory too)."""
        count = min(count, self.pages)
        t = count * self.page
        self.k = self.k[:, :, t : max(self.held, t)].clone()
        self.v = self.v[:, :, t : max(self.held, t)].clone()
        self.base += t

    def clone(self) -> History:
        """A copy with the same spare capacity (a fork's next step appends without reallocating)."""
        h = History(*self.shape, self.dtype, self.page)
        h.k, h.v = self.k.clone(), self.v.clone()
        h.base, h.n, h.recalled, h.last_used = self.base, self.n, self.recalled, self.last_used
        h.queries = None if self.queries is None else self.queries.clone()
        return h

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta) for the session's encoded cache (workers/device_tier.py)."""
        return ({"history_k": self.k[:, :, : self.held], "history_v": self.v[:, :, : self.held]},
                {"base": self.base, "n": self.n, "page": self.page, "recalled": self.recalled})

    @classmethod
    def restore(cls, shape: tuple[int, int, int], dtype: torch.dtype, tensors: dict[str, torch.Tensor],
                meta: dict) -> History:
        """Inverse of export. Raises ValueError on a malformed record."""
        k, v = tensors["history_k"], tensors["history_v"]
        base, n, page = meta.get("base"), meta.get("n"), meta.get("page")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (base, n, page)) or page < 1 \
                or base % page or not 0 <= base <= n:
            raise ValueError(f"bad history description {meta!r}")
        want = (*shape[:2], n - base, shape[2])
        if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != dtype or v.dtype != dtype:
            raise ValueError(f"history of {tuple(k.shape)} {k.dtype}; this engine keeps {want} {dtype}")
        h = cls(*shape, dtype, page)
        h.base = h.n = base
        h.reserve(n - base + max(RESTORE_SPARE, (n - base) // 4))  # the next turns append without a copy
        h.k[:, :, : n - base], h.v[:, :, : n - base] = k, v
        h.advance(n - base)
        h.recalled = int(meta.get("recalled", 0))
        return h


class Histories:
    """One engine's histories by slot, within `max_bytes` of host memory."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, page: int,
                 max_bytes: int):
        self.shape, self.dtype, self.page, self.max_bytes = (num_layers, num_kv_heads, head_dim), dtype, page, max_bytes
        self.by_slot: dict[int, History] = {}
        self.clock = itertools.count(1)
        self.pages_dropped = 0

    def get(self, slot: int) -> History:
        h = self.by_slot.get(slot)
        if h is None:
            h = self.by_slot[slot] = History(*self.shape, self.dtype, self.page)
        return h

    def touch(self, slot: int) -> History:
        h = self.get(slot)
        h.last_used = next(self.clock)
        return h

    def put(self, slot: int, h: History) -> None:
        h.last_used = next(self.clock)
        self.by_slot[slot] = h
        self.enforce()

    def reset(self, slot: int) -> None:
        self.by_slot.pop(slot, None)

    def copy(self, src: int, dst: int) -> None:
        h = self.by_slot.get(src)
        if h is None:
            self.by_slot.pop(dst, None)
        else:
            self.by_slot[dst] = h.clone()
            self.enforce()

    def nbytes(self) -> int:
        return sum(h.nbytes() for h in self.by_slot.values())

    def enforce(self) -> int:
        """Drop the oldest pages of the least recently used sessions until the pool fits. -> pages dropped."""
        dropped, total = 0, self.nbytes()
        if total <= self.max_bytes:
            return 0
        for h in sorted(self.by_slot.values(), key=lambda h: h.last_used):
            while total > self.max_bytes and h.pages:
                per_page = max(1, h.nbytes() // max(h.pages, 1))
                count = min(h.pages, -(-(total - self.max_bytes) // per_page))
                before = h.nbytes()
                h.drop_pages(count)
                total -= before - h.nbytes()
                dropped += count
            if total <= self.max_bytes:
                break
        self.pages_dropped += dropped
        return dropped
