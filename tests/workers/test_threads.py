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


def test_the_scheduler_prepares_the_decode_buckets_on_its_own_thread_before_serving(tiny_ckpt, monkeypatch):
    """Inductor generates its CPU loops for the torch threads of the thread that compiles, so the
    warm-up (compiled steps, CUDA graphs) runs on the scheduler thread at its count, and the
    constructor returns only after it."""
    import pytest

    engine = Engine(EngineConfig(model="tiny", max_slots=2, compile=True), checkpoint=tiny_ckpt)
    seen, real = [], engine.warm_up

    def spy():
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real()

    monkeypatch.setattr(engine, "warm_up", spy)
    sched = BatchScheduler(engine, threads=2)
    try:
        assert seen == [("lessserve-scheduler", 2)]
        assert sorted(engine.graphs.graphs) == [1, 2]  # every bucket prepared when the constructor returns
    finally:
        sched.close()

    def broken():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(engine, "warm_up", broken)
    with pytest.raises(RuntimeError, match="no compiler"):  # a failed warm-up is the constructor's error
        BatchScheduler(engine, threads=1)
