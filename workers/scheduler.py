"""Continuous batching over one engine: a background thread interleaves prefill chunks with
decode steps that batch every active session together, streaming tokens back as they come.

The one generation interface of the project: the cluster's worker consumes `generate()` (an async
iterator on its event loop); the CLI, evaluations and tests consume `stream()` (a plain iterator
on their own thread). Both are the same request in the same loop; the engine is touched only by
the scheduler thread (and `call` / `run_exclusive` run a function there, between steps).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from lessserve.workers.engine import Engine
from lessserve.workers.errors import SchedulerStoppedError
from lessserve.workers.sampling import sample

_DONE = object()
T = TypeVar("T")


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    min_tokens: int = 0  # no stop id is sampled before this many tokens (vLLM's min_tokens)


@dataclass
class _Request:
    slot: int
    ids: list[int]
    params: SamplingParams
    emit: Callable[[object], None]  # thread-safe: a token id, an Exception, or _DONE
    tokens: list[int]  # every sampled token, authoritative (the cache consumed all but the last)
    offset: int = 0  # prefill progress into ids
    generated: int = 0
    pending: int | None = None  # sampled token to feed on the next decode step
    marks: dict[int, Callable[[], None]] = field(default_factory=dict)  # offset -> run once ids[:offset] are in
    gen: torch.Generator | None = None
    cancelled: bool = False
    t_submit: float = field(default_factory=time.perf_counter)


class BatchScheduler:
    def __init__(self, engine: Engine, max_batch: int = 32, on_step: Callable[[str, int, float], None] | None = None,
                 threads: int | None = None):
        """`threads`: torch CPU threads of the scheduler thread, the process's one compute thread
        (workers/threads.py); None: as many as the creating thread computes with."""
        self.engine = engine
        self.threads = threads or torch.get_num_threads()
        self.max_batch = max_batch
        self.on_step = on_step  # metrics hook: (kind, tokens, seconds)
        self._incoming: deque[_Request] = deque()
        self._prefilling: deque[_Request] = deque()
        self._decoding: list[_Request] = []
        self._calls: deque[tuple[Callable[[], object], Callable[[object, BaseException | None], None]]] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._ready = threading.Event()
        self._warm_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lessserve-scheduler", daemon=True)
        self._thread.start()
        self._ready.wait()  # the engine's decode buckets are prepared before the first request
        if self._warm_error is not None:
            raise self._warm_error

    # --- public -----------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._incoming) + len(self._prefilling) + len(self._decoding)

    def _submit(self, slot: int, ids: Sequence[int], params: SamplingParams, emit: Callable[[object], None],
                tokens: list[int] | None, marks: dict[int, Callable[[], None]] | None) -> _Request:
        if not ids:
            raise ValueError("a turn needs at least one new token")
        req = _Request(slot, list(ids), params, emit, tokens if tokens is not None else [],
                       marks={m: fn for m, fn in (marks or {}).items() if 0 < m <= len(ids)})
        if params.seed is not None:
            req.gen = torch.Generator().manual_seed(params.seed)
        with self._cv:
            if self._stop:
                raise SchedulerStoppedError("the scheduler has stopped")
            self._incoming.append(req)
            self._cv.notify()
        return req

    async def generate(self, slot: int, ids: Sequence[int], params: SamplingParams,
                       tokens: list[int] | None = None,
                       marks: dict[int, Callable[[], None]] | None = None) -> AsyncIterator[int]:
        """Prefill `ids` into `slot`, then yield sampled tokens (the stop token included).

        `tokens`, if given, receives every sampled token, also when the consumer stops early: once
        this generator is closed the scheduler has let go of the request and `tokens[:-1]` is
        exactly what the slot's cache consumed. `marks`: offset -> fn, run on the scheduler thread
        as soon as the slot has consumed `ids[:offset]` (a prefill chunk ends there); an error in
        fn is the request's error."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        released = asyncio.Event()

        def emit(item):
            loop.call_soon_threadsafe(q.put_nowait, item)
            if item is _DONE or isinstance(item, BaseException):
                loop.call_soon_threadsafe(released.set)

        req = self._submit(slot, ids, params, emit, tokens, marks)
        try:
            while True:
                item = await q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancelled = True  # a client that went away stops costing compute
            await released.wait()

    def stream(self, slot: int, ids: Sequence[int], params: SamplingParams, tokens: list[int] | None = None,
               marks: dict[int, Callable[[], None]] | None = None) -> Iterator[int]:
        """`generate` for a caller without an event loop (the CLI, evaluations, tests): the same
        request, consumed on the calling thread; closing the iterator early cancels it."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        released = threading.Event()

        def emit(item):
            q.put(item)
            if item is _DONE or isinstance(item, BaseException):
                released.set()

        req = self._submit(slot, ids, params, emit, tokens, marks)
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancelled = True
            released.wait()

    def complete(self, ids: Sequence[int], params: SamplingParams) -> list[int]:
        """A one-off completion in a fresh slot, freed afterwards: the sampled tokens (evaluations)."""
        slot = self.call(self.engine.alloc)
        try:
            return list(self.stream(slot, ids, params))
        finally:
            self.call(lambda: self.engine.free(slot))

    def call(self, fn: Callable[[], T]) -> T:
        """`run_exclusive` for a caller without an event loop: fn runs on the scheduler thread."""
        box: queue.SimpleQueue = queue.SimpleQueue()
        with self._cv:
            if self._stop:
                raise SchedulerStoppedError("the scheduler has stopped")
            self._calls.append((fn, lambda result, exc: box.put((result, exc))))
            self._cv.notify()
        result, exc = box.get()
        if exc is not None:
            raise exc
        return result

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the scheduler thread between steps: every engine mutation (restoring,
        offloading, freeing a slot) is serialised with the forward passes."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(result, exc):
            def settle():
                if fut.cancelled():
                    return
                fut.set_exception(exc) if exc is not None else fut.set_result(result)

            loop.call_soon_threadsafe(settle)

        with self._cv:
            if self._stop:
                raise SchedulerStoppedError("the scheduler has stopped")
            self._calls.append((fn, done))
            self._cv.notify()
        return await fut

    def wait_idle(self, timeout: float = 60.0) -> bool:
        end = time.monotonic() + timeout
        while self.active and time.monotonic() < end:
            time.sleep(0.01)
        return not self.active

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def __enter__(self) -> BatchScheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        try:  # here, at this thread's torch threads: inductor generates its CPU loops for the threads it sees
            self.engine.warm_up()  # CUDA graphs / compiled steps of every batch bucket
        except BaseException as e:  # noqa: BLE001 - raised again by the constructor (a bucket's own failure is
            self._warm_error = e  # caught inside warm_up: that bucket runs eagerly)
            return
        finally:
            self._ready.set()
        while True:
            with self._cv:
                while not self._stop and not (self._incoming or self._prefilling or self._decoding or self._calls):
                    self._cv.wait()
                if self._stop:
                    self._fail_pending()
                    return
                while self._incoming:
                    self._prefilling.append(self._incoming.popleft())
                calls = list(self._calls)
                self._calls.clear()
            for fn, done in calls:
                try:
                    done(fn(), None)
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    done(None, e)
            if not (self._prefilling or self._decoding):
                continue
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - report to every waiting caller, keep serving
                for r in [*self._prefilling, *self._decoding]:
                    r.emit(e)
                self._prefilling.clear()
                self._decoding.clear()

    def _fail_pending(self) -> None:
        """Under the lock, at stop: every waiting request and call gets an error, none hangs."""
        err = SchedulerStoppedError("the scheduler has stopped")
        for r in [*self._incoming, *self._prefilling, *self._decoding]:
            r.emit(err)
        for _, done in self._calls:
            done(None, err)
        self._incoming.clear(), self._prefilling.clear(), self._decoding.clear(), self._calls.clear()

    def _step(self) -> None:
        # The step's token budget: one prefill chunk (at most prefill_chunk tokens, oldest request first)
        # beside one decode token per decoding session, so a long prompt, a rebuild or a shared
        # prefix is spread over many steps and never stalls the others' decoding (chunked prefill).
        while self._prefilling and self._prefilling[0].cancelled:
            self._prefilling.popleft().emit(_DONE)
        if self._prefilling:
            self._prefill_chunk(self._prefilling[0])
        for r in self._decoding:
            if r.cancelled:
                r.emit(_DONE)
        self._decoding = [r for r in self._decoding if not r.cancelled]
        if self._decoding:
            self._decode_step(self._decoding[: self.max_batch])

    def _prefill_chunk(self, r: _Request) -> None:
        eng = self.engine
        _, size = next(eng.chunks(eng.slab.seen[r.slot], len(r.ids) - r.offset))
        size = min([size, *(m - r.offset for m in r.marks if m > r.offset)])  # a chunk ends at every mark
        t0 = time.perf_counter()
        chunk = torch.tensor(r.ids[r.offset : r.offset + size], dtype=torch.long)[None]
        logits = eng.forward([r.slot], chunk, last_only=True)[:, -1]
        r.offset += size
        if self.on_step:
            self.on_step("prefill", size, time.perf_counter() - t0)
        if r.offset in r.marks:
            try:
                r.marks.pop(r.offset)()
            except Exception as e:  # noqa: BLE001 - this request's own error, not the batch's
                self._prefilling.popleft()
                r.emit(e)
                return
        if r.offset == len(r.ids):
            more = self._emit_next(r, logits[0])  # if this raises, r is still listed: it gets the error
            self._prefilling.popleft()
            if more:
                self._decoding.append(r)

    def _decode_step(self, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        # one transfer of the batch's logits per step (one device sync), not one per request
        logits = self.engine.decode([r.slot for r in batch], [r.pending for r in batch]).cpu()
        if self.on_step:
            self.on_step("decode", len(batch), time.perf_counter() - t0)
        done = {id(r) for r, lg in zip(batch, logits, strict=True) if not self._emit_next(r, lg)}
        self._decoding = [r for r in self._decoding if id(r) not in done]

    def _emit_next(self, r: _Request, logits: torch.Tensor) -> bool:
        """Sample, stream the token; True while the request continues decoding."""
        p = r.params
        logits = logits[None].cpu()
        if r.generated < p.min_tokens and p.stop_ids:
            logits = logits.clone()
            logits[:, list(p.stop_ids)] = float("-inf")
        tok = int(sample(logits, p.temperature, p.top_p, r.gen)[0])
        r.generated += 1
        r.tokens.append(tok)
        r.emit(tok)
        if tok in p.stop_ids or r.generated >= p.max_new_tokens:
            r.emit(_DONE)
            return False
        r.pending = tok
        return True
