"""Sessions' histories for `+recall`: every token a session consumed, its post-RoPE K/V per layer
and KV head, on the host, in pages the recall round (kernels/reference/recall.py) scores and
brings back into the slot at each new turn.

A History is append-only from position `base` (a multiple of the page size) to `n` (the tokens
the session consumed, = the slot's `seen`); pages before `base` were dropped under host pressure
and can no longer come back (their tokens stay folded into the LESS state, as plain eviction
leaves them). Storage is a list of fixed-size blocks (`BLOCK_TOKENS`, a multiple of the page, so
no page straddles two), like a paged KV cache: appending allocates a block now and then and never
copies what is held (a history that doubled its one tensor copied 4,096 tokens' K/V, 189 MB, in the
turn that crossed 4,096), and dropping pages frees the blocks they empty. Pages carry no summary: the recall
round scores every history key exactly (per-page key summaries chose worse on dev: docs/recall.md).

Histories is the engine's pool, one History per slot in use: forks copy it, a reset or a freed slot
drops it, and when the pool holds more than `max_bytes` the oldest pages of the least recently used
sessions go first (down to none: that session degrades to plain eviction, never to an error).
"""

from __future__ import annotations

import itertools

import torch

HISTORY_FIELDS = ("history_k", "history_v")  # the codec tensors a session's history travels as
HISTORY_IDS = "history_ids"  # and its token ids (older records lack them: unknown, -1)
BLOCK_TOKENS = 64  # tokens per storage block (rounded up to a multiple of the page)


class History:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, page: int):
        self.shape, self.dtype, self.page = (num_layers, num_kv_heads, head_dim), dtype, page
        self.block = -(-BLOCK_TOKENS // page) * page
        self.blocks_k: list[torch.Tensor] = []  # each [L, Hkv, block, D]
        self.blocks_v: list[torch.Tensor] = []
        self.blocks_ids: list[torch.Tensor] = []  # each [block] int64, -1 where unknown
        self.start = 0  # where position `base` lies in the first block (a multiple of the page)
        self.base = 0  # first position held
        self.n = 0  # tokens consumed: positions [base, n) are held
        self.recalled = 0  # tokens brought back into the slot so far
        self.queries: list[torch.Tensor] | None = None  # per layer [Hq, <= Q, D]: the last queries (choose pages)
        self.lent: list | None = None  # per layer, the recall round's Lent, until the turn's end returns it
        self.last_used = 0  # the pool's clock at the latest step

    # --- size ------------------------------------------------------------------------------
    @property
    def held(self) -> int:
        return self.n - self.base

    @property
    def pages(self) -> int:
        """Full pages held."""
        return self.held // self.page

    @property
    def capacity(self) -> int:
        """Tokens the blocks hold room for, from `base`."""
        return len(self.blocks_k) * self.block - self.start

    def token_bytes(self) -> int:
        L, Hkv, D = self.shape
        return 2 * L * Hkv * D * self.dtype.itemsize

    def nbytes(self) -> int:
        """Bytes of the tokens held (what the host budget counts; the blocks round each session's
        storage up by less than one block)."""
        return self.held * self.token_bytes()

    def allocated_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks_k + self.blocks_v)

    def _spans(self, a: int, count: int) -> list[tuple[int, int, int, int]]:
        """History indices [a, a + count) as (block, offset in it, offset in the run, length) pieces."""
        out, g, t = [], self.start + a, 0
        while t < count:
            b, o = divmod(g + t, self.block)
            m = min(count - t, self.block - o)
            out.append((b, o, t, m))
            t += m
        return out

    def key_blocks(self, count: int | None = None) -> list[torch.Tensor]:
        """Views [L, Hkv, m, D] of every layer's keys at history indices [0, count) (default: all held),
        in order."""
        return [self.blocks_k[b][:, :, o : o + m] for b, o, _, m in self._spans(0, self.held if count is None
                                                                                else count)]

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's keys and values at history indices idx [m] (< held): ([L, Hkv, m, D] each)."""
        g = idx.long() + self.start
        b, o = g // self.block, g % self.block
        L, Hkv, D = self.shape
        k = torch.empty(L, Hkv, len(idx), D, dtype=self.dtype)
        v = torch.empty_like(k)
        for blk in b.unique().tolist():  # the few blocks the indices fall in
            at = (b == blk).nonzero().flatten()
            k[:, :, at] = self.blocks_k[blk][:, :, o[at]]
            v[:, :, at] = self.blocks_v[blk][:, :, o[at]]
        return k, v

    def ids(self, start: int = 0) -> torch.Tensor:
        """Token ids at history indices [start, held) [m] int64 (-1 where unknown)."""
        out = torch.empty(self.held - start, dtype=torch.long)
        for b, o, t, m in self._spans(start, self.held - start):
            out[t : t + m] = self.blocks_ids[b][o : o + m]
        return out

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held token, contiguous: (k, v) [L, Hkv, held, D] (a copy)."""
        L, Hkv, D = self.shape
        k = torch.empty(L, Hkv, self.held, D, dtype=self.dtype)
        v = torch.empty_like(k)
        for b, o, t, m in self._spans(0, self.held):
            k[:, :, t : t + m] = self.blocks_k[b][:, :, o : o + m]
            v[:, :, t : t + m] = self.blocks_v[b][:, :, o : o + m]
        return k, v

    def keep_queries(self, layer: int, q: torch.Tensor, count: int) -> None:
        """q [Hq, C, D]: one layer's queries of the step in progress; the last `count` queries the
        session consumed are kept (the next recall round's), whatever the steps' sizes."""
        if self.queries is None:
            self.queries = [q[:, :0]] * self.shape[0]
        self.queries[layer] = torch.cat([self.queries[layer], q[:, -count:]], dim=1)[:, -count:]

    # --- appending -------------------------------------------------------------------------
    def reserve(self, count: int) -> None:
        """Room for `count` more tokens: new blocks, nothing held is copied."""
        L, Hkv, D = self.shape
        while self.capacity < self.held + count:
            self.blocks_k.append(torch.empty(L, Hkv, self.block, D, dtype=self.dtype))
            self.blocks_v.append(torch.empty(L, Hkv, self.block, D, dtype=self.dtype))
            self.blocks_ids.append(torch.full((self.block,), -1, dtype=torch.long))

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor, layer: int | slice = slice(None)) -> None:
        """K / V of positions start .. start + C - 1 (reserved before): [Hkv, C, D] at one layer, or
        [L, Hkv, C, D] at every layer (the default)."""
        for b, o, t, m in self._spans(start - self.base, k.shape[-2]):
            self.blocks_k[b][layer, :, o : o + m] = k[..., t : t + m, :]
            self.blocks_v[b][layer, :, o : o + m] = v[..., t : t + m, :]

    def write_ids(self, start: int, ids: torch.Tensor) -> None:
        """The token ids [C] of positions start .. start + C - 1 (reserved before)."""
        for b, o, t, m in self._spans(start - self.base, len(ids)):
            self.blocks_ids[b][o : o + m] = ids[t : t + m]

    def advance(self, count: int) -> None:
        """`count` tokens were written at every layer: they are held now."""
        self.n += count

    # --- dropping, copying, travelling -----------------------------------------------------
    def drop_pages(self, count: int) -> None:
        """Forget the `count` oldest full pages; blocks left empty are freed."""
        t = min(count, self.pages) * self.page
        self.base += t
        self.start += t
        gone = min(self.start // self.block, len(self.blocks_k))
        del self.blocks_k[:gone], self.blocks_v[:gone], self.blocks_ids[:gone]
        self.start -= gone * self.block

    def clone(self) -> History:
        """A copy with the same spare capacity (a fork's next step appends without allocating)."""
        h = History(*self.shape, self.dtype, self.page)
        h.blocks_k, h.blocks_v = [b.clone() for b in self.blocks_k], [b.clone() for b in self.blocks_v]
        h.blocks_ids = [b.clone() for b in self.blocks_ids]
        h.start, h.base, h.n, h.recalled, h.last_used = self.start, self.base, self.n, self.recalled, self.last_used
        h.queries = None if self.queries is None else [q.clone() for q in self.queries]
        h.lent = self.lent  # read only: a fork's turn end returns its own slot's copy of the pages
        return h

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta) for the session's encoded cache (workers/device_tier.py). `lent` stays: a turn's
        end returns the pages before its session is saved; a session saved mid-reply keeps them pinned
        until its next round unpins them."""
        k, v = self.tensors()
        return ({"history_k": k, "history_v": v, HISTORY_IDS: self.ids()},
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
        h.reserve(n - base)
        h.write(base, k, v)
        ids = tensors.get(HISTORY_IDS)
        if ids is not None and tuple(ids.shape) == (n - base,) and not ids.dtype.is_floating_point:
            h.write_ids(base, ids.long())
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
                per_page = h.page * h.token_bytes()
                count = min(h.pages, -(-(total - self.max_bytes) // per_page))
                before = h.nbytes()
                h.drop_pages(count)
                total -= before - h.nbytes()
                dropped += count
            if total <= self.max_bytes:
                break
        self.pages_dropped += dropped
        return dropped
