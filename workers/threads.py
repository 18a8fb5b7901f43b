"""One compute thread per process: where the engine's torch CPU threads go.

libgomp (torch's OpenMP on Linux) keeps a worker team per thread that ever ran a parallel
region, and never releases it. When the thread that loads the model and the scheduler thread that
runs the steps both use N threads, two teams share the cores and every parallel region of the
scheduler waits for its workers to wake up: a decode step (default model, batch 4, 2 cores) took
226 ms on the scheduler thread against 148 ms when it was the only thread with a team.

So the thread that builds the engine (model loading) runs torch at one thread, and the
scheduler thread sets N when it starts (`BatchScheduler(threads=N)`). The count is in effect
process-wide (libgomp keeps it globally for threads outside an OpenMP region), so a thread that
runs large torch ops after the scheduler has started still starts a team of its own. An I/O
thread's slot copies on offload and restore once did (a decode step: 175 ms before a run with
offloads, 240 ms after it); every slab operation now runs on the scheduler thread itself
(workers/session_store.py reaches the slab through `run_exclusive`), so there is no second team.

The scheduler thread also allocates from a glibc arena of its own, and glibc hands a non-main
arena's freed top back to the kernel as soon as it passes the trim threshold, so every step's
temporaries fault their pages in again. Fixed thresholds (`keep_freed_memory`) stop that: the
same compressed decode step (h2o+less, batch 4) went from 306 to 151 ms on the scheduler thread,
a 256-token prefill chunk from 1,756 to 674 ms (MALLOC_ARENA_MAX=1 measured alike).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
MMAP_THRESHOLD = 32 << 20  # allocations above this are mmapped (and unmapped when freed)
TRIM_THRESHOLD = 64 << 20  # free memory an arena keeps before giving it back


def keep_freed_memory() -> bool:
    """Fixed glibc malloc thresholds (no trimming of a thread arena's top below TRIM_THRESHOLD);
    False where the C library is not glibc (nothing to tune)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def reserve_compute_threads(requested: int = 0) -> int:
    """Call before any torch work in the process: returns the threads for the compute thread
    (`requested`, or this thread's torch default, e.g. OMP_NUM_THREADS as Ray sets it) and drops
    the calling thread to one."""
    n = requested or torch.get_num_threads()
    torch.set_num_threads(1)
    keep_freed_memory()
    return n
