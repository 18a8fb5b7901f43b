"""A turn's two threads and its one resource: the slab (engine, device and host tiers) is touched
only on the scheduler thread, the shared tier only on the event loop; a turn cancelled anywhere
gives back its pin; a shared tier that hangs costs a deadline, never the scheduler thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from lessserve.cache_store.config import StoreConfig
from lessserve.cache_store.errors import TierUnavailableError
from lessserve.cache_store.kv import MemoryKV
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.scheduler import BatchScheduler, SamplingParams
from lessserve.workers.session_store import SessionStore
from tests.conftest import tiny_checkpoint


class RecordingKV(MemoryKV):
    """The shared state in memory, recording the thread of every call; `hang` makes every call wait forever."""

    name = "cluster"

    def __init__(self):
        super().__init__()
        self.threads: set[str] = set()
        self.hang = False
        self.down = False


def _recorded(name: str):
    base = getattr(MemoryKV, name)

    async def call(self, *a, **kw):
        self.threads.add(threading.current_thread().name)
        if self.hang:
            await asyncio.Event().wait()
        if self.down:
            raise TierUnavailableError("the shared state is down")
        return await base(self, *a, **kw)

    return call


for _name in ("get", "get_many", "set", "set_many", "swap", "pop", "delete", "exists", "keys", "used"):
    setattr(RecordingKV, _name, _recorded(_name))


@pytest.fixture
def world(tmp_path):
    """A tiny engine, its scheduler thread, a SessionStore reaching the slab through it, and the
    thread of every slab access (the device tier's calls)."""
    engine = Engine(EngineConfig(policy="h2o", budget=16, max_slots=2, prefill_chunk=8, device="cpu",
                                 dtype="float32"), checkpoint=tiny_checkpoint(tmp_path), tokenizer=FakeTok())
    sched = BatchScheduler(engine)
    shared = RecordingKV()
    ss = SessionStore(engine, StoreConfig(redis_timeout_s=1.0, device_idle_s=None, host_idle_s=None), kv=shared,
                      run_local=sched.run_exclusive)
    slab_threads: set[str] = set()
    for name in ("get", "put", "delete", "new_slot"):
        real = getattr(ss.device, name)

        def wrapped(*a, _real=real, **kw):
            slab_threads.add(threading.current_thread().name)
            return _real(*a, **kw)

        setattr(ss.device, name, wrapped)
    yield engine, sched, ss, shared, slab_threads
    sched.close()


class FakeTok:
    """A tokenizer over the tiny model's 128 ids: one id per character."""

    eos_token_id = 0
    all_special_ids = [0]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 127 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i % 26) for i in ids if not (skip_special_tokens and i == 0))


async def turn(ss, sched, sid, messages, n=4, done: list | None = None):
    """One whole turn; `done` receives the loop time of its last token (before the turn closes)."""
    async with ss.turn(sid, messages, n) as (session, new_ids, tokens):
        params = SamplingParams(max_new_tokens=n, stop_ids=())
        async for _ in sched.generate(session.slot, new_ids, params, tokens, session.marks):
            pass
        if done is not None:
            done.append(asyncio.get_running_loop().time())
    return tokens


def msgs(*words):
    return [{"role": "user", "content": w} for w in words]


def test_the_slab_on_the_scheduler_thread_and_the_shared_tier_on_the_loop(world):
    engine, sched, ss, shared, slab_threads = world

    async def main():
        await turn(ss, sched, "a", msgs("hello there"))
        assert await ss.offload("a", "shared") == "cluster"
        await turn(ss, sched, "a", [*msgs("hello there"), {"role": "assistant", "content": "x"}, *msgs("again")])
        await ss.drain()
        return threading.current_thread().name

    loop_thread = asyncio.run(main())
    assert slab_threads == {"lessserve-scheduler"}
    assert shared.threads == {loop_thread}


def test_a_turn_cancelled_anywhere_gives_its_pin_back(world):
    engine, sched, ss, shared, _ = world

    async def cancel_after(delay: float, sid: str):
        task = asyncio.create_task(turn(ss, sched, sid, msgs("a long enough message " * 4), n=64))
        await asyncio.sleep(delay)
        task.cancel()  # a loaded machine may have finished the turn already: either way, no pin is left
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def main():
        for i, delay in enumerate((0.0, 0.001, 0.01, 0.05, 0.2)):
            await cancel_after(delay, f"c{i}")
            assert not ss.store._pins, (delay, ss.store._pins)
        # every slot is free to take again: two whole turns on new sessions
        await turn(ss, sched, "after-1", msgs("hi"))
        await turn(ss, sched, "after-2", msgs("hi"))

    asyncio.run(main())


def test_a_hung_shared_tier_costs_a_deadline_not_the_scheduler(world):
    engine, sched, ss, shared, _ = world

    async def main():
        await turn(ss, sched, "held", msgs("a session held on this worker"))
        shared.hang = True
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        slow = asyncio.create_task(turn(ss, sched, "new", msgs("a new session needs its transcript")))
        await asyncio.sleep(0.05)
        # meanwhile the held session's turn decodes: the scheduler thread never waits on the shared tier
        t1, done = loop.time(), []
        await turn(ss, sched, "held", [*msgs("a session held on this worker"),
                                       {"role": "assistant", "content": "x"}, *msgs("more")], done=done)
        held_s = done[0] - t1  # its reply is whole before its transcript write gives up
        await slow  # the transcript read gave up at the deadline: the request's history rebuilt it
        return held_s, loop.time() - t0

    held_s, slow_s = asyncio.run(main())
    deadline = ss.store.timeout_s
    assert held_s < deadline, (held_s, deadline)
    # two deadlines (the fetch, the transcript write) and the turn's own compute: never a hang
    assert deadline <= slow_s < 2 * deadline + 5.0, (slow_s, deadline)
    assert ss.transcript_read_failures >= 1


def test_a_session_forgotten_between_its_two_hops_is_rebuilt_from_its_transcript(world):
    """The cache only the shared tier held is lost, and maintenance forgot the session on this worker
    while its copy was being fetched: the turn rebuilds it from the durable transcript."""
    engine, sched, ss, shared, _ = world

    async def main():
        first = msgs("hello there")
        await turn(ss, sched, "s", first)
        assert await ss.offload("s", "shared") == "cluster"
        await ss.store.shared.delete("s")
        real = ss._fetch

        async def fetch_and_forget(sid, need):
            await ss.run_local(lambda: ss.sessions.pop(sid, None))
            return await real(sid, need)

        ss._fetch = fetch_and_forget
        tokens = await turn(ss, sched, "s", [*first, {"role": "assistant", "content": "x"}, *msgs("again")])
        return tokens, ss.sessions["s"].transcript.turns

    tokens, turns = asyncio.run(main())
    assert tokens and turns == 2


def test_a_prompt_past_the_limit_is_refused_before_any_prefill(world):
    """A 195,000-character system prompt once prefilled for minutes (through the shared-prefix path)
    before its length was checked, stalling every session: now a ContextOverflowError, nothing run."""
    from lessserve.workers.errors import ContextOverflowError

    engine, sched, ss, shared, slab_threads = world
    huge = [{"role": "system", "content": "You are the harbour master. " * 7000}, *msgs("hello")]

    forwards, real_forward = [], engine.forward

    def counted(slots, ids, *a, **kw):
        forwards.append(ids.shape[-1])
        return real_forward(slots, ids, *a, **kw)

    engine.forward = counted

    async def main():
        with pytest.raises(ContextOverflowError, match=f"max_model_len={engine.max_model_len}"):
            await turn(ss, sched, "big", huge)
        refused_after = len(forwards)
        return refused_after, await turn(ss, sched, "small", msgs("hello"))

    refused_after, tokens = asyncio.run(main())
    assert refused_after == 0 and tokens  # not one forward pass for the refused prompt
    assert ss.prefix_builds == 0 and "big" not in ss.sessions and not ss.store._pins


def test_a_delete_during_an_outage_leaves_the_store_consistent(world):
    """A DELETE during a Redis outage once freed the device slot, failed on Redis and left the
    location map saying "device": once the slots were full, unrelated new sessions got 404 naming
    the deleted id. Now the local copies go first and consistently; the shared failure is a 503."""
    engine, sched, ss, shared, _ = world

    async def main():
        await turn(ss, sched, "del-0", msgs("hello"))
        shared.down = True
        with pytest.raises(TierUnavailableError):
            await ss.delete("del-0")
        shared.down = False
        replies = [await turn(ss, sched, f"new-{i}", msgs("hello")) for i in range(2 * engine.cfg.max_slots)]
        return replies, await ss.where("del-0") if ss.store.holds("del-0") else None

    replies, where = asyncio.run(main())
    assert all(replies) and where is None and not ss.store._pins


def test_a_corrupt_shared_copy_is_deleted_and_the_session_rebuilt(world):
    """A copy that fails to decode is never tried again: the turn that met it rebuilds the session
    from its transcript and deletes the copy (a copy that stayed cost every later turn a fetch)."""
    engine, sched, ss, shared, _ = world

    async def main():
        first = msgs("hello there")
        await turn(ss, sched, "s", first)
        assert await ss.offload("s", "shared") == "cluster"
        await ss.store.shared.put("s", b"not an encoded session cache" * 8)
        tokens = await turn(ss, sched, "s", [*first, {"role": "assistant", "content": "x"}, *msgs("again")])
        return tokens, await ss.store.shared.contains("s"), ss.store.recomputes_total

    tokens, still_there, recomputes = asyncio.run(main())
    assert tokens and not still_there and recomputes == 1


@pytest.mark.parametrize("kind", ["rebuild", "shared prompt"])
def test_a_long_rebuild_or_shared_prompt_is_prefilled_between_other_sessions_decode_steps(world, kind):
    """Neither a lost cache's re-prefill nor a new shared system prompt runs in one go on the slab's
    thread: both are chunks of the turn's own request, each step beside the decoding sessions' (on
    the old code both were one synchronous prefill between two steps, reported as no prefill step)."""
    engine, sched, ss, _, _ = world
    steps: list[tuple[str, int]] = []
    sched.on_step = lambda k, n, dt: steps.append((k, n))
    text = "a long history that has to be computed again " * 5  # 230 ids: 29 chunks of 8

    async def main():
        if kind == "rebuild":
            msgs = [{"role": "user", "content": text}]
            await turn(ss, sched, "long", msgs, n=2)
            msgs = [*(await ss.transcript("long")).messages, {"role": "user", "content": "and?"}]
            await ss.store.forget_cache("long")  # lost: the next turn re-prefills the transcript
        else:
            msgs = [{"role": "system", "content": text}, {"role": "user", "content": "hi"}]
        steps.clear()
        short = asyncio.create_task(turn(ss, sched, "short", [{"role": "user", "content": "hi"}], n=120))
        while ("decode", 1) not in steps:
            await asyncio.sleep(0.001)
        start = len(steps)
        await turn(ss, sched, "long-2" if kind != "rebuild" else "long", msgs, n=1)
        during = steps[start:]
        await short
        return during

    during = asyncio.run(main())
    assert sum(n for k, n in during if k == "prefill") >= len(text)  # the history went through the scheduler
    last_decode = max(i for i, (k, _) in enumerate(during) if k == "decode")
    prefills = [i for i, (k, _) in enumerate(during[:last_decode]) if k == "prefill"]  # while "short" decodes
    assert len(prefills) >= 5, during
    between = [during[a + 1 : b] for a, b in zip(prefills, prefills[1:], strict=False)]
    assert all(any(k == "decode" for k, _ in gap) for gap in between), during  # a decode step between chunks
