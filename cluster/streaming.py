"""A turn's events -> what the client reads, for both APIs: `open_turn` starts it (an error before
anything was generated is raised, so it becomes an HTTP status), `collect` reads a whole reply, and
`sse` is the one server-sent-events writer; the two APIs differ only in their `SseFrames`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from lessserve.cluster.http_errors import HttpError, http_error
from lessserve.cluster.metrics import MetricsSink, TokenTimer
from lessserve.cluster.openai_types import error_body, usage
from lessserve.cluster.protocol import (
    EndEvent,
    ErrorEvent,
    Event,
    PromptEvent,
    StartEvent,
    TokenEvent,
    TokenLogprob,
    TurnBackend,
    TurnRequest,
)

log = logging.getLogger("ray.serve")


@dataclass
class Choice:
    """One choice's output so far (n > 1: one per choice)."""

    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    end: EndEvent | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def finish_reason(self) -> str:
        return self.end.finish_reason if self.end else "length"


@dataclass
class TurnOutcome:
    """What a turn produced so far, and its timing."""

    start: StartEvent
    timer: TokenTimer
    choices: dict[int, Choice] = field(default_factory=dict)
    prompt: PromptEvent | None = None

    def choice(self, i: int) -> Choice:
        if (c := self.choices.get(i)) is None:
            c = self.choices[i] = Choice()
        return c

    def add(self, ev: Event) -> TokenEvent | None:
        """Take one event after the start; returns a token event. An error event raises."""
        match ev:
            case TokenEvent():
                self.timer.tick()
                c = self.choice(ev.index)
                c.pieces.append(ev.text)
                c.logprobs += ev.logprobs
                return ev
            case EndEvent():
                self.choice(ev.index).end = ev
            case PromptEvent():
                self.prompt = ev
            case ErrorEvent(error=h):
                raise h.api_error()
        return None

    def ordered(self) -> list[Choice]:
        return [self.choices[i] for i in sorted(self.choices)] or [Choice()]

    @property
    def text(self) -> str:
        return self.choice(0).text

    @property
    def finish_reason(self) -> str:
        return self.choice(0).finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(c.end.completion_tokens for c in self.choices.values() if c.end)

    def record(self, metrics: MetricsSink) -> None:
        metrics.record_request(self.timer.ttft, self.timer.itls, self.completion_tokens, self.start.prefilled)


async def open_turn(backend: TurnBackend, req: TurnRequest, *, stream: bool, t0: float,
                    guard: Callable[[str, AsyncIterator[Event]], AsyncIterator[Event]] | None = None,
                    ) -> tuple[TurnOutcome, AsyncIterator[Event]]:
    """Start the turn and read its first event: the start (-> the outcome and the events after
    it), or an error, raised as the ApiError it names. `guard(owner, events)`: the key's quota of
    turns in flight (KeyQuotas.guard), held until the events end or are closed."""
    events = backend.turn(req, stream=stream)
    if guard is not None:
        events = guard(req.owner, events)
    first = await anext(events)
    if isinstance(first, ErrorEvent):
        if hasattr(events, "aclose"):
            await events.aclose()
        raise first.error.api_error()
    return TurnOutcome(first, TokenTimer(t0)), events


async def collect(turn: TurnOutcome, events: AsyncIterator[Event]) -> TurnOutcome:
    """The rest of a turn that is answered whole."""
    async for ev in events:
        turn.add(ev)
    return turn


def sse_data(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"  # the end of an OpenAI-style (chat, completions) stream


def sse_error(h: HttpError | None, e: BaseException) -> list[str]:
    """The in-band error of an OpenAI-style stream that has started (`h` None: not a known error), then DONE."""
    return [sse_data(error_body(f"generation failed: {h.message if h else type(e).__name__}",
                                h.type if h else "server_error", code=h.code if h else "stream_interrupted")),
            DONE]


def turn_usage(turn: TurnOutcome) -> dict:
    """The OpenAI usage of a turn: its history once, every choice's tokens, the part served from the cache."""
    return usage(turn.start.prompt_tokens, turn.completion_tokens, turn.start.prefilled)


class SseFrames(Protocol):
    """One API's stream format."""

    def opening(self) -> list[str]: ...

    def delta(self, ev: TokenEvent) -> str:
        """The frame of a token event ("" for none: a forced tool call is sent whole at the end)."""
        ...

    async def closing(self, turn: TurnOutcome) -> list[str]:
        """After the turn ended well; may finish work that can still fail (it is reported in-band)."""
        ...

    def error(self, h: HttpError | None, e: BaseException) -> list[str]:
        """The in-band report of an error after the stream started (`h` None: not a known one)."""
        ...

    async def aborted(self) -> None:
        """The stream ended before its closing frames (an error, or the client went away): undo
        what only a completed turn should leave behind."""
        ...


async def sse(turn: TurnOutcome, events: AsyncIterator[Event], frames: SseFrames, metrics: MetricsSink,
              label: str) -> AsyncIterator[str]:
    """The stream of a started turn: opening frames, one delta per token, then the closing frames
    and the turn recorded in the metrics, or an in-band error that ends the stream."""
    closing = None
    try:
        for chunk in frames.opening():
            yield chunk
        try:
            async for ev in events:
                tok = turn.add(ev)
                if tok is not None and (frame := frames.delta(tok)):
                    yield frame
            closing = await frames.closing(turn)
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band, then end it
            log.warning("stream %s ended by %s: %s", label, type(e).__name__, e)
            for chunk in frames.error(http_error(e), e):
                yield chunk
            return
    finally:
        if closing is None:  # an error, or the client went away (cancelled): undone, whatever cancels it
            await asyncio.shield(frames.aborted())
    turn.record(metrics)
    for chunk in closing:
        yield chunk
