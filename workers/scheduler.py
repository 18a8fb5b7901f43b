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

from lessserve.workers.constraints import Constraint
from lessserve.workers.engine import Engine
from lessserve.workers.errors import SchedulerStoppedError
from lessserve.workers.sampling import PromptLogprobs, Sampled, logprobs_at, sample

_DONE = object()
T = TypeVar("T")


@dataclass
class SamplingParams:
    max_new_tokens: int = 256  # 0: prefill only (a prompt's logprobs)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # choice i of n samples with seed + i
    stop_ids: tuple[int, ...] = ()
    min_tokens: int = 0  # no stop id is sampled before this many tokens (vLLM's min_tokens)
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely (OpenAI top_logprobs)
    prompt_logprobs: int | None = None  # None: none; k: the prompt's logprobs (one PromptLogprobs), top k each
    constraint: Constraint | None = None  # the grammar the reply must follow (each choice gets its own copy)
    forks: tuple[int, ...] = ()  # slots the caller allocated for choices 1..n-1: each starts as a copy of
    # the request's slot once the prompt is in (prefilled once), then samples and decodes on its own


class _Group:
    """A request's choices together: what the caller receives, and when all of them have ended."""

    def __init__(self, emit: Callable[[object], None], stopped: set[int] | None):
        self.emit = emit  # thread-safe: a Sampled, a PromptLogprobs, an Exception, or _DONE (once, last)
        self.left = 1  # choices still prefilling or decoding
        self.cancelled = False
        self.stopped = stopped if stopped is not None else set()  # choices the caller has ended


@dataclass
class _Request:
    slot: int
    ids: list[int]
    params: SamplingParams
    group: _Group
    tokens: list[int]  # every sampled token, authoritative (the cache consumed all but the last)
    index: int = 0  # the choice
    offset: int = 0  # prefill progress into ids
    generated: int = 0
    pending: int | None = None  # sampled token to feed on the next decode step
    marks: dict[int, Callable[[], None]] = field(default_factory=dict)  # offset -> run once ids[:offset] are in
    gen: torch.Generator | None = None
    constraint: Constraint | None = None
    prompt_lp: list[float | None] = field(default_factory=list)
    prompt_top: list[tuple] = field(default_factory=list)
    t_submit: float = field(default_factory=time.perf_counter)
    on_end: Callable[[Sequence[int]], None] | None = None  # the engine's end_turn (+recall: lent pages go back)

    @property
    def cancelled(self) -> bool:
        return self.group.cancelled or self.index in self.group.stopped

    def emit(self, item: object) -> None:
        self.group.emit(item)

    def end(self) -> None:
        """This choice is over (its slot's turn ends first); the caller is released when every choice is."""
        if self.on_end is not None:
            self.on_end, end_turn = None, self.on_end
            end_turn([self.slot])
        self.group.left -= 1
        if self.group.left == 0:
            self.group.emit(_DONE)

    def fail(self, e: BaseException) -> None:
        self.group.emit(e)
        self.end()


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


class BatchScheduler:
    def __init__(self, engine: Engine, max_batch: int = 32, on_step: Callable[[str, int, float], None] | None = None,
                 threads: int | None = None):
        """`threads`: torch CPU threads of the scheduler thread, the process's one compute thread
        (workers/threads.py); None: as many as the creating thread computes with."""
        self.engine = engine
        self.threads = threads or torch.get_num_threads()
        self.max_batch = max_batch
        self.on_step = on_step  # metrics hook: (kind, tokens, seconds)
        # +recall: a choice's end gives its slot's lent pages back, on this thread, before the caller sees it end
        self._end_turn = engine.end_turn if engine.histories is not None else None
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
                tokens: list[int] | None, marks: dict[int, Callable[[], None]] | None,
                stopped: set[int] | None = None) -> _Request:
        if not ids:
            raise ValueError("a turn needs at least one new token")
        req = _Request(slot, list(ids), params, _Group(emit, stopped), tokens if tokens is not None else [],
                       marks={m: fn for m, fn in (marks or {}).items() if 0 < m <= len(ids)},
                       gen=_generator(params.seed), constraint=params.constraint, on_end=self._end_turn)
        if params.prompt_logprobs is not None:
            req.prompt_lp, req.prompt_top = [None], [()]  # the first token has no context to be predicted from
        with self._cv:
            if self._stop:
                raise SchedulerStoppedError("the scheduler has stopped")
            self._incoming.append(req)
            self._cv.notify()
        return req

    async def generate(self, slot: int, ids: Sequence[int], params: SamplingParams,
                       tokens: list[int] | None = None, marks: dict[int, Callable[[], None]] | None = None,
                       stopped: set[int] | None = None) -> AsyncIterator[Sampled | PromptLogprobs]:
        """Prefill `ids` into `slot`, then yield what is sampled (the stop token included): a
        `Sampled` per token of every choice (`params.forks`), after one `PromptLogprobs` when
        `params.prompt_logprobs` asks for it.

        `tokens`, if given, receives choice 0's every sampled token, also when the consumer stops
        early: once this generator is closed the scheduler has let go of the request (all its
        choices) and `tokens[:-1]` is exactly what the slot's cache consumed. `marks`: offset -> fn,
        run on the scheduler thread as soon as the slot has consumed `ids[:offset]` (a prefill
        chunk ends there); an error in
        fn is the request's error. `stopped`: the caller adds a choice's index to end that choice
        (its stop string came) while the others go on."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        released = asyncio.Event()

        def emit(item):
            loop.call_soon_threadsafe(q.put_nowait, item)
            if item is _DONE:
                loop.call_soon_threadsafe(released.set)

        req = self._submit(slot, ids, params, emit, tokens, marks, stopped)
        try:
            while True:
                item = await q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.group.cancelled = True  # a client that went away stops costing compute
            await released.wait()

    def stream(self, slot: int, ids: Sequence[int], params: SamplingParams, tokens: list[int] | None = None,
               marks: dict[int, Callable[[], None]] | None = None) -> Iterator[Sampled | PromptLogprobs]:
        """`generate` for a caller without an event loop (the CLI, evaluations, tests): the same
        request, consumed on the calling thread; closing the iterator early cancels it."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        released = threading.Event()

        def emit(item):
            q.put(item)
            if item is _DONE:
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
            req.group.cancelled = True
            released.wait()

    def complete(self, ids: Sequence[int], params: SamplingParams) -> list[int]:
        """A one-off completion in a fresh slot, freed afterwards: the sampled tokens (evaluations)."""
        slot = self.call(self.engine.alloc)
        try:
            return [s.token for s in self.stream(slot, ids, params) if isinstance(s, Sampled)]
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
                    r.fail(e)
                self._prefilling.clear()
                self._decoding.clear()

    def _fail_pending(self) -> None:
        """Under the lock, at stop: every waiting request and call gets an error, none hangs."""
        err = SchedulerStoppedError("the scheduler has stopped")
        for r in [*self._incoming, *self._prefilling, *self._decoding]:
            r.fail(err)
        for _, done in self._calls:
            done(None, err)
        self._incoming.clear(), self._prefilling.clear(), self._decoding.clear(), self._calls.clear()

    def _step(self) -> None:
        # The step's token budget: one prefill chunk (at most prefill_chunk tokens, oldest request first)
        # beside one decode token per decoding session, so a long prompt, a rebuild or a shared
        # prefix is spread over many steps and never stalls the others' decoding (chunked prefill).
        while self._prefilling and self._prefilling[0].cancelled:
            self._prefilling.popleft().end()
        if self._prefilling:
            self._prefill_chunk(self._prefilling[0])
        for r in self._decoding:
            if r.cancelled:
                r.end()
        self._decoding = [r for r in self._decoding if not r.cancelled]
        if self._decoding:
            self._decode_step(self._decoding[: self.max_batch])

    def _prefill_chunk(self, r: _Request) -> None:
        eng, p = self.engine, r.params
        _, size = next(eng.chunks(eng.slab.seen[r.slot], len(r.ids) - r.offset))
        size = min([size, *(m - r.offset for m in r.marks if m > r.offset)])  # a chunk ends at every mark
        left = len(r.ids) - r.offset
        recall = eng.histories is not None  # +recall: the prompt's last chunk ends with the recall round
        t0 = time.perf_counter()
        chunk = torch.tensor(r.ids[r.offset : r.offset + size], dtype=torch.long)[None]
        logits = eng.forward([r.slot], chunk, last_only=p.prompt_logprobs is None,
                             recall=recall and size == left)[0]  # [size or 1, V]
        if p.prompt_logprobs is not None:  # position j predicts ids[offset + j + 1], within the prompt
            m = min(size, len(r.ids) - 1 - r.offset)
            targets = torch.tensor(r.ids[r.offset + 1 : r.offset + 1 + m], dtype=torch.long)
            lp, top = logprobs_at(logits[:m], targets, p.prompt_logprobs)
            r.prompt_lp += lp
            r.prompt_top += top
        r.offset += size
        if self.on_step:
            self.on_step("prefill", size, time.perf_counter() - t0)
        if r.offset in r.marks:
            try:
                r.marks.pop(r.offset)()
            except Exception as e:  # noqa: BLE001 - this request's own error, not the batch's
                self._prefilling.popleft()
                r.fail(e)
                return
        if r.offset == len(r.ids):
            self._prefilling.popleft()
            self._prompt_done(r, logits[-1])

    def _prompt_done(self, r: _Request, logits: torch.Tensor) -> None:
        """The prompt is in: its logprobs out, the choices forked from its slot, each one's first token."""
        p = r.params
        if p.prompt_logprobs is not None:
            r.emit(PromptLogprobs(r.prompt_lp, r.prompt_top))
        if p.max_new_tokens == 0:
            r.end()
            return
        try:
            forks = []
            for i, slot in enumerate(p.forks, 1):
                self.engine.slab.copy(r.slot, slot)
                forks.append(_Request(slot, r.ids, p, r.group, [], index=i, offset=r.offset,
                                      gen=_generator(None if p.seed is None else p.seed + i),
                                      constraint=r.constraint.fork() if r.constraint else None,
                                      on_end=self._end_turn))
        except Exception as e:  # noqa: BLE001 - this request's own error (a fork slot it was not given)
            r.fail(e)
            return
        r.group.left += len(forks)
        for c in [r, *forks]:
            if self._emit_next(c, logits):
                self._decoding.append(c)

    def _decode_step(self, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        # one transfer of the batch's logits per step (one device sync), not one per request
        logits = self.engine.decode([r.slot for r in batch], [r.pending for r in batch]).cpu()
        if self.on_step:
            self.on_step("decode", len(batch), time.perf_counter() - t0)
        done = {id(r) for r, lg in zip(batch, logits, strict=True) if not self._emit_next(r, lg)}
        self._decoding = [r for r in self._decoding if id(r) not in done]

    def _emit_next(self, r: _Request, logits: torch.Tensor) -> bool:
        """Sample, stream the token; True while the choice continues decoding. A failure here (its
        grammar) ends this choice with the error, never the batch."""
        try:
            return self._sample(r, logits)
        except Exception as e:  # noqa: BLE001 - this request's own error
            r.fail(e)
            return False

    def _sample(self, r: _Request, logits: torch.Tensor) -> bool:
        p = r.params
        raw = logits[None].cpu()  # [1, V]; the batch's row: never modified in place
        lg = raw
        if (r.generated < p.min_tokens and p.stop_ids) or r.constraint is not None:
            lg = raw.clone()
            if r.generated < p.min_tokens and p.stop_ids:
                lg[:, list(p.stop_ids)] = float("-inf")
            if r.constraint is not None:
                r.constraint.mask_(lg)
        tok = int(sample(lg, p.temperature, p.top_p, r.gen)[0])
        lp, top = None, ()
        if p.logprobs is not None:
            (lp,), (top,) = logprobs_at(raw, torch.tensor([tok]), p.logprobs)
        if r.constraint is not None:
            r.constraint.accept(tok)
        r.generated += 1
        r.tokens.append(tok)
        r.emit(Sampled(tok, r.index, lp, top))
        if tok in p.stop_ids or r.generated >= p.max_new_tokens or (r.constraint is not None and r.constraint.stopped):
            r.end()
            return False
        r.pending = tok
        return True
