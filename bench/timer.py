"""The one timer of every benchmark: median seconds per call after warm-up calls.

On CUDA it times with device events (the kernel's own time, not the launch); elsewhere with
perf_counter. Several closures (one per rotated input copy) are called in turn, so caches do not
flatter a kernel that would re-read the same bytes. `setup`, if given, runs before every call,
untimed (e.g. restoring the state a measurement starts from).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


class Timer:
    def __init__(self, device: torch.device | str = "cpu", warmup: int = 1, iters: int = 5):
        self.device, self.warmup, self.iters = torch.device(device), warmup, iters

    def samples(self, fns: Sequence[Callable[[], object]] | Callable[[], object],
                setup: Callable[[], object] | None = None) -> list[float]:
        """Seconds of each timed call (warm-up calls excluded)."""
        fns = [fns] if callable(fns) else list(fns)
        for i in range(self.warmup):
            if setup:
                setup()
            fns[i % len(fns)]()
        out = []
        for i in range(self.iters):
            fn = fns[i % len(fns)]
            if setup:
                setup()
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
        return out

    def __call__(self, fns, setup=None) -> float:
        """Median seconds per call."""
        return statistics.median(self.samples(fns, setup))

    def copy_bandwidth(self, nbytes: int) -> float:
        """Bytes/s of a device-to-device copy of `nbytes` (read + write counted)."""
        x = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        y = torch.empty_like(x)
        return 2 * x.numel() / self([lambda: y.copy_(x)])
