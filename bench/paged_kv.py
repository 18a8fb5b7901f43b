"""A paged full-KV cache, as vLLM and SGLang run one: `bench serve`'s full-KV competitor.

A pool of fixed-size blocks (16 tokens) holds every token's post-RoPE K/V, exactly (full attention,
nothing evicted inside a sequence). A sequence owns a list of blocks; its token t lives in row
`blocks[t // 16] * 16 + t % 16` of the pool. Bytes are held per token (rounded up to a block), not
per preallocated max_context slot.

`PagedEngine` is the engine interface the project's `BatchScheduler` drives (`forward`, `decode`,
`chunks`, `slab.seen`, `warm_up`), over the one model (workers/model.py) through its `attend`
callback: the scheduler's chunked prefill and batched decode run unchanged. Which sequences hold
blocks, and who is evicted when the pool is full, is bench/paged_sessions.py's job.

Attention per sequence and layer, after the chunk's K/V are written into its blocks:
- decode (one query token): one score matmul per run of consecutive blocks (the allocator keeps
  a sequence's blocks consecutive where it can), one softmax, one value matmul per run: no gather;
- a prefill chunk: SDPA over a view of the rows when the blocks form one run, as the `full`
  policy attends over its slot's rows (kernels/fast_attention.py); over several runs, the runs
  are gathered into one contiguous K/V first (its cost is shared by the chunk's tokens).

The pool may store K/V in another dtype than the model computes in (`PagedConfig.kv_dtype`):
`float8_e4m3fn` is vLLM's `--kv-cache-dtype fp8` with its default per-tensor scale of 1.0 (no
calibrated scales): a value is cast to fp8 (saturating at +-448) when written, and the rows a
sequence reads (its runs, above) are cast back to the compute dtype; the pool is never
dequantised whole. A block then holds 1 byte per element: a byte budget buys 4x the fp32 blocks,
and attention is exact over the fp8 values, no longer over the model's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from lessserve.errors.tree import CapacityError
from lessserve.workers.engine import prefill_chunks
from lessserve.workers.errors import ContextOverflowError

BLOCK_TOKENS = 16  # vLLM's default block size
KvDtype = Literal["float32", "bfloat16", "float16", "float8_e4m3fn"]  # storage dtypes a pool takes


class PagedConfig(BaseModel):
    kv_bytes: int = Field(ge=1, description="K/V bytes of the block pool; it gets the whole blocks that fit")
    block_tokens: int = Field(BLOCK_TOKENS, ge=1, le=4096, description="tokens per block")
    prefill_chunk: int = Field(8192, ge=1, le=65536, description="tokens per prefill step (BatchScheduler)")
    kv_dtype: KvDtype | None = Field(None, description="storage dtype of K/V (None: the model's)")

    def storage_dtype(self, compute: torch.dtype) -> torch.dtype:
        return compute if self.kv_dtype is None else getattr(torch, self.kv_dtype)


class BlockPool:
    """K/V blocks of every layer, layer-major so one layer of a run of blocks is a plain view:
      k, v  [L, Hkv, N * BS, D]  kv_dtype (default: the model's `dtype`); block b = rows [b * BS, (b + 1) * BS)
    Written through `write` (cast to kv_dtype), read through `read` (cast to `dtype`).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_tokens: int,
                 device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype | None = None):
        self.num_blocks, self.block_tokens, self.dtype = num_blocks, block_tokens, dtype
        kv_dtype = kv_dtype or dtype
        rows = num_blocks * block_tokens
        self.k = torch.zeros(num_layers, num_kv_heads, rows, head_dim, dtype=kv_dtype, device=device)
        self.v = torch.zeros(num_layers, num_kv_heads, rows, head_dim, dtype=kv_dtype, device=device)
        self._free = set(range(num_blocks))

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.k.dtype

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k / v [Hkv, C, D] (compute dtype) into pool rows `rows` [C] of the layer, cast to kv_dtype."""
        for pool, x in ((self.k, k), (self.v, v)):
            dst, src = pool[layer], self._store(x)  # [Hkv, N * BS, D], [Hkv, C, D]
            if dst.dtype.itemsize == 1:  # index_copy_ has no fp8 kernel on the CPU: copy the bytes
                dst, src = dst.view(torch.uint8), src.view(torch.uint8)
            dst.index_copy_(1, rows, src)

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        """x in kv_dtype: fp8 saturates at its largest finite value (as vLLM's conversion does)."""
        kv = self.kv_dtype
        if x.dtype == kv:
            return x
        if kv.itemsize == 1:
            x = x.clamp(-torch.finfo(kv).max, torch.finfo(kv).max)
        return x.to(kv)

    def read(self, x: torch.Tensor, a: int, e: int) -> torch.Tensor:
        """Rows [a, e) of one layer's k or v [Hkv, N * BS, D] -> [Hkv, e - a, D] in the compute dtype
        (a view when the pool stores that dtype)."""
        return x[:, a:e].to(self.dtype)

    @staticmethod
    def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_tokens: int, dtype: torch.dtype) -> int:
        """K and V of one block, every layer and KV head."""
        return 2 * num_layers * num_kv_heads * block_tokens * head_dim * dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        L, H, _, D = self.k.shape
        return self.block_bytes(L, H, D, self.block_tokens, self.kv_dtype)

    @property
    def total_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def alloc(self, n: int, after: int | None = None) -> list[int]:
        """n free blocks: the ones right after block `after` first (a sequence's run goes on), then
        the first free run long enough, then the lowest free ids. CapacityError if fewer are free."""
        if n > len(self._free):
            raise CapacityError(f"{n} blocks asked, {len(self._free)} of {self.num_blocks} free")
        out: list[int] = []
        b = -1 if after is None else after
        while len(out) < n and b + 1 in self._free:
            b += 1
            out.append(b)
        self._free.difference_update(out)
        if len(out) < n:
            rest = self._first_fit(n - len(out))
            self._free.difference_update(rest)
            out += rest
        return out

    def _first_fit(self, n: int) -> list[int]:
        free = sorted(self._free)
        start = 0
        for i in range(1, len(free) + 1):
            if i == len(free) or free[i] != free[i - 1] + 1:
                if i - start >= n:
                    return free[start : start + n]
                start = i
        return free[:n]

    def free(self, blocks: Sequence[int]) -> None:
        self._free.update(blocks)


def runs(blocks: Sequence[int], tokens: int, bs: int) -> list[tuple[int, int]]:
    """Pool rows [start, end) holding tokens [0, tokens) of a sequence, merged where blocks are consecutive."""
    out: list[list[int]] = []
    left = tokens
    for b in blocks[: -(-tokens // bs)]:
        n = min(bs, left)
        if out and out[-1][1] == b * bs:
            out[-1][1] += n
        else:
            out.append([b * bs, b * bs + n])
        left -= n
    return [(a, e) for a, e in out]


class PagedEngine:
    """The BatchScheduler's engine interface over a BlockPool. A "slot" is a sequence id; its blocks
    are reserved by the caller (`reserve`) before a step needs them, never allocated mid-step."""

    def __init__(self, base, cfg: PagedConfig):
        """`base`: an Engine whose model, tokenizer, stop ids, device and dtype this one shares."""
        a = base.args
        self.cfg = cfg
        self.model, self.tokenizer, self.stop_ids = base.model, base.tokenizer, base.stop_ids
        self.model_id, self.args, self.device, self.dtype = base.model_id, a, base.device, base.dtype
        self.max_model_len = base.max_model_len
        kv_dtype = cfg.storage_dtype(base.dtype)
        bb = BlockPool.block_bytes(a.num_layers, a.num_kv_heads, a.head_dim, cfg.block_tokens, kv_dtype)
        self.pool = BlockPool(a.num_layers, a.num_kv_heads, a.head_dim, cfg.kv_bytes // bb, cfg.block_tokens,
                              base.device, base.dtype, kv_dtype)
        self.scale = a.head_dim ** -0.5
        self.seen: dict[int, int] = {}  # sequence -> tokens consumed (its next position)
        self.blocks: dict[int, list[int]] = {}  # sequence -> its blocks, in token order
        self._next = 0
        self.slab = self  # the scheduler reads engine.slab.seen[slot]
        self.histories = None  # no +recall

    @property
    def policy_name(self) -> str:
        kv = "" if self.pool.kv_dtype == self.dtype else f", {str(self.pool.kv_dtype).removeprefix('torch.')} K/V"
        return f"full (paged, {self.cfg.block_tokens}-token blocks{kv})"

    # --- sequences ---------------------------------------------------------------------------
    def alloc(self) -> int:
        s, self._next = self._next, self._next + 1
        self.seen[s], self.blocks[s] = 0, []
        return s

    def free(self, seq: int) -> None:
        self.pool.free(self.blocks.pop(seq))
        del self.seen[seq]

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.cfg.block_tokens)

    def reserve(self, seq: int, tokens: int) -> None:
        """Blocks for `tokens` tokens of the sequence in all (CapacityError when the pool lacks them)."""
        bl = self.blocks[seq]
        more = self.blocks_for(tokens) - len(bl)
        if more > 0:
            bl += self.pool.alloc(more, bl[-1] if bl else None)

    def trim(self, seq: int) -> None:
        """Blocks past the tokens consumed go back to the pool."""
        bl, keep = self.blocks[seq], self.blocks_for(self.seen[seq])
        self.pool.free(bl[keep:])
        del bl[keep:]

    def warm_up(self) -> dict[int, str]:
        return {}

    def chunks(self, start: int, count: int) -> Iterator[tuple[int, int]]:
        return prefill_chunks(start, count, self.cfg.prefill_chunk)  # the engine's rule

    # --- the step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, slots: Sequence[int], tokens: torch.Tensor, last_only: bool = False,
                recall: bool = False) -> torch.Tensor:
        """tokens [n, C] of n sequences -> logits [n, C, V] (or [n, 1, V]); their K/V into their blocks."""
        n, C = tokens.shape
        slots = list(slots)
        seen = [self.seen[s] for s in slots]
        bs = self.cfg.block_tokens
        for s, ln in zip(slots, seen, strict=True):
            if ln + C > self.max_model_len:
                raise ContextOverflowError(f"sequence would reach {ln + C} tokens; max_model_len={self.max_model_len}")
            if ln + C > len(self.blocks[s]) * bs:
                raise CapacityError(f"sequence {s}: {ln + C} tokens, {len(self.blocks[s])} blocks reserved")
        positions = torch.tensor(seen, dtype=torch.long)[:, None] + torch.arange(C)[None, :]  # [n, C]
        rows = []  # per sequence: pool rows of the chunk's tokens [C]
        for s, pos in zip(slots, positions, strict=True):
            bl = torch.tensor(self.blocks[s], dtype=torch.long)
            rows.append((bl[pos // bs] * bs + pos % bs).to(self.device))
        spans = [runs(self.blocks[s], ln + C, bs) for s, ln in zip(slots, seen, strict=True)]
        pool = self.pool

        def attend(layer: int, q, k, v):  # q [n, Hq, C, D], k / v [n, Hkv, C, D]
            kl, vl = pool.k[layer], pool.v[layer]  # [Hkv, N * BS, D] kv_dtype
            out = []
            for i in range(n):
                pool.write(layer, rows[i], k[i], v[i])
                out.append(self._attend_one(q[i], kl, vl, spans[i], seen[i]))
            return torch.stack(out)  # [n, Hq, C, D]

        logits = self.model(tokens.to(self.device), positions.to(self.device), attend, last_only=last_only)
        for s in slots:
            self.seen[s] += C
        return logits

    def _attend_one(self, q: torch.Tensor, kl: torch.Tensor, vl: torch.Tensor, spans: list[tuple[int, int]],
                    ln: int) -> torch.Tensor:
        """q [Hq, C, D] over the sequence's ln + C tokens, held at pool rows `spans` of kl / vl
        [Hkv, rows, D] (the pool's kv_dtype) -> [Hq, C, D]: exact causal attention over what the pool holds."""
        C = q.shape[1]
        if C == 1:
            return self._decode_runs(q, kl, vl, spans)
        rd = self.pool.read
        if len(spans) == 1:
            a, e = spans[0]
            k, v = rd(kl, a, e), rd(vl, a, e)  # [Hkv, T, D] (views when the pool stores the compute dtype)
        else:
            k = torch.cat([rd(kl, a, e) for a, e in spans], dim=1)  # [Hkv, T, D]
            v = torch.cat([rd(vl, a, e) for a, e in spans], dim=1)
        if C == 1 or ln == 0:
            o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=C > 1, enable_gqa=True)
        else:
            mask = torch.ones(C, ln + C, dtype=torch.bool, device=q.device).tril(ln)
            o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)
        return o[0]

    def _decode_runs(self, q: torch.Tensor, kl: torch.Tensor, vl: torch.Tensor,
                     spans: list[tuple[int, int]]) -> torch.Tensor:
        """One query token [Hq, 1, D] over its runs of rows, without gathering them (on one run, a
        plain matmul pair is faster on the CPU than SDPA's grouped-query path: 325 vs 394 us for
        3,000 tokens of the default model)."""
        Hq, _, D = q.shape
        Hkv = kl.shape[0]
        rd = self.pool.read
        qg = q.reshape(Hkv, Hq // Hkv, D)  # [Hkv, g, D]: query heads grouped by their KV head
        s = torch.cat([qg @ rd(kl, a, e).transpose(1, 2) for a, e in spans], dim=-1)  # [Hkv, g, T]
        p = torch.softmax(s.float() * self.scale, dim=-1).to(q.dtype)
        o, off = None, 0
        for a, e in spans:
            part = p[..., off : off + e - a] @ rd(vl, a, e)  # [Hkv, g, D]
            o = part if o is None else o + part
            off += e - a
        return o.reshape(Hq, 1, D)

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """One decode step for many sequences together -> logits [n, V]."""
        t = torch.as_tensor(list(tokens), dtype=torch.long)[:, None]
        return self.forward(slots, t, last_only=True)[:, -1]

    @torch.inference_mode()
    def prefill(self, seq: int, ids: Sequence[int]) -> torch.Tensor:
        """Feed tokens to one sequence in prefill chunks (its blocks reserved) -> logits [V] of the last."""
        t = torch.as_tensor(list(ids), dtype=torch.long)
        for off, size in self.chunks(self.seen[seq], len(t)):
            lg = self.forward([seq], t[None, off : off + size], last_only=True)
        return lg[0, -1]
