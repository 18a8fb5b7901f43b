"""Continuous batching gives every session exactly the tokens it gets alone."""

import asyncio

from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.scheduler import BatchScheduler, SamplingParams
from tests.workers.replay import greedy


def test_concurrent_sessions_match_sequential_generation(tiny_ckpt):
    cfg = EngineConfig(model="tiny", policy="h2o", budget=16, prefill_chunk=8, max_slots=4)
    prompts = [list(range(3, 3 + n)) for n in (5, 30, 47)]
    alone = Engine(cfg, checkpoint=tiny_ckpt)
    expected = []
    for p in prompts:
        expected.append(greedy(alone, alone.alloc(), p, 12, stop_ids=()))
    eng = Engine(cfg, checkpoint=tiny_ckpt)
    sched = BatchScheduler(eng)
    steps = []
    sched.on_step = lambda kind, n, dt: steps.append((kind, n))

    async def one(p):
        s = eng.alloc()
        return [t.token async for t in sched.generate(s, p, SamplingParams(max_new_tokens=12))]

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    got = asyncio.run(main())
    sched.close()
    assert got == expected
    assert any(kind == "decode" and n > 1 for kind, n in steps)  # sessions really decoded together


def test_a_failure_after_the_last_prefill_chunk_reaches_its_caller(tiny_ckpt, monkeypatch):
    """The first token is sampled right after the last prefill chunk: an error there is the turn's
    error (it hung the turn forever, found by the OpenAPI fuzzer)."""
    import pytest

    from lessserve.workers import scheduler as mod

    eng = Engine(EngineConfig(model="tiny", policy="h2o", budget=16, prefill_chunk=8, max_slots=2),
                 checkpoint=tiny_ckpt)
    sched = BatchScheduler(eng)
    monkeypatch.setattr(mod, "sample", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("sampling broke")))

    async def one():
        return [t.token async for t in sched.generate(eng.alloc(), [3, 4, 5], SamplingParams(max_new_tokens=4))]

    async def main():
        return await asyncio.wait_for(one(), timeout=60)

    with pytest.raises(RuntimeError, match="sampling broke"):
        asyncio.run(main())
    sched.close()


def test_min_tokens_keeps_stop_ids_out_until_reached(tiny_ckpt):
    """A stop id the model would pick first is never sampled before min_tokens (vLLM's semantics),
    and ends the turn once allowed."""
    cfg = EngineConfig(model="tiny", policy="h2o", budget=16, prefill_chunk=8, max_slots=2)
    alone = Engine(cfg, checkpoint=tiny_ckpt)
    stop = greedy(alone, alone.alloc(), [3, 4, 5, 6], 12, stop_ids=())[0]  # the greedy first token, made a stop id
    eng = Engine(cfg, checkpoint=tiny_ckpt)
    sched = BatchScheduler(eng)

    async def one(params):
        return [t.token async for t in sched.generate(eng.alloc(), [3, 4, 5, 6], params)]

    try:
        plain = asyncio.run(one(SamplingParams(max_new_tokens=12, stop_ids=(stop,))))
        held = asyncio.run(one(SamplingParams(max_new_tokens=12, stop_ids=(stop,), min_tokens=12)))
    finally:
        sched.close()
    assert plain == [stop]  # without min_tokens the stop id ends the turn at once
    assert len(held) == 12 and stop not in held


def test_marks_end_a_chunk_run_once_and_fail_only_their_own_request(tiny_ckpt):
    import pytest

    eng = Engine(EngineConfig(model="tiny", policy="h2o", budget=16, prefill_chunk=8, max_slots=2),
                 checkpoint=tiny_ckpt)
    seen_at: list[int] = []
    with BatchScheduler(eng) as sched:
        a, b = sched.call(eng.alloc), sched.call(eng.alloc)
        ids = list(range(3, 23))
        marks = {5: lambda: seen_at.append(eng.slab.seen[a]), 99: lambda: seen_at.append(-1)}
        got = [t.token for t in sched.stream(a, ids, SamplingParams(max_new_tokens=3), marks=marks)]
        assert seen_at == [5] and len(got) == 3  # a chunk ended at 5; a mark past the ids never runs

        def broken():
            raise RuntimeError("mark broke")

        other = sched.stream(b, ids, SamplingParams(max_new_tokens=30))
        first = next(other)  # b is decoding while a's request fails at its mark
        with pytest.raises(RuntimeError, match="mark broke"):
            list(sched.stream(a, [7, 8, 9], SamplingParams(max_new_tokens=3), marks={2: broken}))
        assert len([first, *other]) == 30  # b never saw a's error


def test_a_stopped_scheduler_fails_waiting_work_and_refuses_new_work(tiny_ckpt):
    import threading

    import pytest

    from lessserve.workers.errors import SchedulerStoppedError

    eng = Engine(EngineConfig(model="tiny", policy="h2o", budget=16, prefill_chunk=8, max_slots=2),
                 checkpoint=tiny_ckpt)
    sched = BatchScheduler(eng)
    slot = sched.call(eng.alloc)
    started, gate = threading.Event(), threading.Event()
    sched.on_step = lambda *a: (started.set(), gate.wait(5))  # hold the first step until close() is under way
    out: list = []

    def consume():
        try:
            out.extend(t.token for t in sched.stream(slot, [3, 4, 5], SamplingParams(max_new_tokens=500)))
        except SchedulerStoppedError as e:
            out.append(e)

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(5)
    closer = threading.Thread(target=sched.close)
    closer.start()
    gate.set()
    t.join(10)
    closer.join(10)
    assert not t.is_alive() and isinstance(out[-1], SchedulerStoppedError)  # failed, not left waiting
    with pytest.raises(SchedulerStoppedError):
        list(sched.stream(slot, [3], SamplingParams(max_new_tokens=2)))
    with pytest.raises(SchedulerStoppedError):
        sched.call(lambda: None)
