"""CUDA graphs for the engine's decode step: one captured graph per batch-size bucket, replayed.

A decode step of n sessions runs in the graph of the smallest bucket b >= n (1, 2, 4, ... up to
max_slots). The graph reads static buffers - tokens [b, 1], slot_ids [b], positions [b, 1] - that
are filled before each replay; rows n..b-1 point at a reserved pad slot of the slab, so padding
never touches a real session. Logits come back as a view of the graph's static output [b, V].

Capture needs a CUDA device and a step with no host synchronisation (the Triton kernels qualify;
the torch reference evict does not). Where capture is impossible the bucket runs eagerly, and the
reason is kept in `DecodeGraphs.fallback` (no silent difference in results: the same step runs).
The capture mechanism is a small backend object, so the bucketing / padding / buffer plumbing is
testable on CPU with `EagerReplay` (tests/workers/test_cuda_graphs.py), which is also how the
torch.compile'd step (workers/compiled.py) gets one static shape per bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# step(tokens [b, 1], slot_ids [b], positions [b, 1]) -> logits [b, V]; runs the model on the slab
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def buckets(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, and max_batch itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class CudaGraphBackend:
    """torch.cuda.CUDAGraph capture: a warm-up run on a side stream (Triton compiles there), then
    the capture into a memory pool shared by every bucket's graph."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up: kernels compiled, allocator primed
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph.replay, out


class EagerReplay:
    """'replay' runs the step again on the same static buffers: same bucketing, padding and buffers
    as a graph, without one. The runner of the compiled step (workers/compiled.py: one shape per
    bucket), and the CPU tests' stand-in for a graph."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        out = fn()

        def replay() -> None:
            out.copy_(fn())

        return replay, out


def backend_for(device: torch.device):
    """The capture backend for a device, or None (with the reason) where graphs are impossible."""
    if device.type != "cuda":
        return None, f"no CUDA graphs on {device.type}"
    return CudaGraphBackend(), None


@dataclass
class _Graph:
    tokens: torch.Tensor  # [b, 1] long
    slot_ids: torch.Tensor  # [b] long
    positions: torch.Tensor  # [b, 1] long
    replay: Callable[[], None]
    logits: torch.Tensor  # [b, V] fp32, the graph's output


class DecodeGraphs:
    def __init__(self, step: StepFn, max_batch: int, pad_slot: int, device: torch.device, backend):
        self.step, self.pad_slot, self.device, self.backend = step, pad_slot, device, backend
        self.buckets = buckets(max_batch)
        self.graphs: dict[int, _Graph] = {}
        self.fallback: dict[int, str] = {}  # bucket -> why it runs eagerly
        self.replays = 0

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _capture(self, b: int) -> _Graph | None:
        dev = self.device
        tokens = torch.zeros(b, 1, dtype=torch.long, device=dev)
        slot_ids = torch.full((b,), self.pad_slot, dtype=torch.long, device=dev)
        positions = torch.zeros(b, 1, dtype=torch.long, device=dev)
        try:
            replay, logits = self.backend.capture(lambda: self.step(tokens, slot_ids, positions))
        except Exception as e:  # noqa: BLE001  (any capture failure means: run this bucket eagerly)
            self.fallback[b] = f"{type(e).__name__}: {e}"[:300]
            log.warning("decode step for batch bucket %d not captured / compiled, running eagerly: %s", b,
                        self.fallback[b])
            return None
        return _Graph(tokens, slot_ids, positions, replay, logits)

    def _get(self, b: int) -> _Graph | None:
        if b in self.fallback:
            return None
        if b not in self.graphs:
            g = self._capture(b)
            if g is None:
                return None
            self.graphs[b] = g
        return self.graphs[b]

    def prepare(self) -> None:
        """Capture every bucket now (each capture runs the step on the pad slot only)."""
        for b in self.buckets:
            self._get(b)

    def run(self, slots: Sequence[int], tokens: Sequence[int], seen: Sequence[int]) -> torch.Tensor | None:
        """Logits [n, V] of one decode step through the bucket's graph; None = run it eagerly."""
        n = len(slots)
        b = self.bucket(n)
        g = None if b is None else self._get(b)
        if g is None:
            return None
        pad = b - n
        g.tokens.copy_(torch.tensor([[t] for t in tokens] + [[0]] * pad, dtype=torch.long))
        g.slot_ids.copy_(torch.tensor(list(slots) + [self.pad_slot] * pad, dtype=torch.long))
        g.positions.copy_(torch.tensor([[s] for s in seen] + [[0]] * pad, dtype=torch.long))
        g.replay()
        self.replays += 1
        return g.logits[:n]
