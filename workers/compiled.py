"""torch.compile of the per-layer compressed decode step (the `compile` switch; CPU's fast path).

What is compiled: `attend_evict_fast` (attention over the slot + the LESS term, evict-and-absorb),
through inductor with static shapes; the model's matmuls stay eager (compiling the whole 30-layer
step took over 10 minutes per shape on two cores). It runs inside the bucketed decode runner of
workers/cuda_graphs.py: every step of n sessions is padded to its bucket b >= n (rows past n on
the reserved pad slot) and reads the slots' whole capacity (no host-known `max_len`), so a bucket
is one shape and one compile; `Engine.warm_up()` compiles every bucket before traffic.

It pays only where the step has many small ops to fuse: with a LESS state (docs/bench_decode.md).
Prefill chunks and the full policy (SDPA over views of each slot's rows) stay eager; so does the
Triton path, which is already fused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lessserve.kernels.fast_evict import attend_evict_fast
from lessserve.kernels.reference.evict import EvictionSpec

_shapes = 0  # compiled-step shapes the engines of this process may ask for (one per bucket)


def compiled_attend(enabled: bool, impl: str, spec: EvictionSpec, buckets: int,
                    kv_bits: str = "native") -> tuple[Callable | None, str | None]:
    """(the compiled step, None) or (None, why it is not compiled)."""
    if not enabled:
        return None, "compile is off"
    if kv_bits != "native":
        return None, f"compile applies to native slots, not kv_bits {kv_bits} (quantised slots step eagerly)"
    if impl != "torch":
        return None, f"compile applies to the torch kernels, not {impl}"
    if spec.mode == "full":
        return None, "the full policy attends with SDPA over views of each slot (nothing to fuse)"
    import torch._dynamo.config as dynamo

    global _shapes
    _shapes += buckets  # dynamo keeps one cache per function: every engine's buckets count against one limit
    dynamo.recompile_limit = max(dynamo.recompile_limit, _shapes + 1)  # past the limit it would run eagerly
    return torch.compile(attend_evict_fast, dynamic=False), None
