"""One compute thread: the engine is built at one torch thread, the scheduler thread sets the reserved count."""

import asyncio
import threading

import torch

from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.scheduler import BatchScheduler
from lessserve.workers.threads import reserve_compute_threads


def test_reserve_drops_the_builder_to_one_and_the_scheduler_thread_sets_the_count(tiny_ckpt):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        n = reserve_compute_threads()
        assert (n, torch.get_num_threads()) == (3, 1)  # the caller (it builds the engine) drops to one
        assert reserve_compute_threads(5) == 5  # an explicit request wins
        sched = BatchScheduler(Engine(EngineConfig(model="tiny", max_slots=1), checkpoint=tiny_ckpt), threads=n)
        try:
            inside = asyncio.run(sched.run_exclusive(lambda: (threading.current_thread().name,
                                                              torch.get_num_threads())))
        finally:
            sched.close()
        assert inside == ("lessserve-scheduler", 3)
    finally:
        torch.set_num_threads(before)


def test_glibc_thresholds_are_fixed_where_glibc_runs():
    import platform

    import pytest

    from lessserve.workers.threads import keep_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the malloc tuning is for glibc")
    assert keep_freed_memory() is True  # mallopt accepted both thresholds
