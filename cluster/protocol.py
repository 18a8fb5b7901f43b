"""The router-worker protocol: one turn request, the events a turn streams back, the session-id
namespaces, and the engine protocol (`TurnBackend`) the router serves through.

A turn is one `TurnRequest` in and a stream of events out:

    StartEvent(prompt_tokens, prefilled) [PromptEvent] TokenEvent(text) ... EndEvent(finish_reason, completion_tokens)

With n > 1 choices, TokenEvents and EndEvents carry their choice's `index` (one EndEvent each);
PromptEvent (the prompt's tokens and logprobs, for /v1/completions' `echo`) comes only when asked.

or an `ErrorEvent` instead of the start (nothing was generated) or after some tokens (the stream
reports it in-band). Events are small frozen dataclasses; they cross Ray as pickled objects, one per
generated token, so they carry no more than the dicts they replace. `type` is a class constant
("start", "token", "end", "error") for code that dispatches on a name rather than a class.

`TurnBackend` is what the router needs from the workers (Ray Serve LLM's engine protocol):
cluster/backend.py implements it over Serve deployment handles, lessserve.testing.fake_backend on
the CPU without Ray or a model, so the HTTP layer is tested on its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lessserve.cluster.http_errors import HttpError
from lessserve.workers.session_ids import (
    PRIVATE_PREFIX,
    RESERVED,
    RESPONSE_PREFIX,
    SESSION_ID_PATTERN,
    client_id,
    is_client_id,
    is_durable,
    namespace,
    private_session,
    response_session,
    scoped_session,
)

__all__ = ["PRIVATE_PREFIX", "RESERVED", "RESPONSE_PREFIX", "SESSION_ID_PATTERN", "EndEvent", "ErrorEvent", "Event",
           "PromptEvent", "StartEvent", "TokenEvent", "TokenLogprob", "TurnBackend", "TurnRequest", "is_client_id",
           "is_durable", "namespace", "private_session", "response_session", "scoped_session", "client_id"]


class TurnRequest(BaseModel):
    """One turn for a worker (`LessWorker.chat`). The router has validated the client's request;
    this checks only what the router itself could get wrong (a session id in no namespace)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    session_id: str | None = Field(None, description="client or response session; None: a one-off turn")
    owner: str
    messages: list[dict[str, str]] = Field(default_factory=list,
                                           description='the whole history, {"role", "content"} (a chat turn)')
    prompt: str | list[int] | None = Field(None, description="raw text or token ids, no chat template (a completion)")
    max_tokens: int = Field(..., ge=0, description="0: only the prompt (its logprobs)")
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    fork_from: str | None = Field(None, description="start as a copy of this session's cache (a response's parent)")
    ephemeral: bool = Field(False, description="forget the session after the turn (store: false)")
    n: int = Field(1, ge=1, description="choices, prefilled once and forked (the session keeps choice 0)")
    logprobs: int | None = Field(None, ge=0, le=20, description="each token's logprob and this many alternatives")
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="the prompt's logprobs (a PromptEvent)")
    echo: bool = Field(False, description="send a PromptEvent with the prompt's text and tokens")
    grammar: str | None = Field(None, description="an llguidance grammar the reply must follow (structured output)")
    tools: list[dict] | None = Field(None, description="function tools, rendered by the chat template")
    auto_tools: bool = Field(False, description="tool_choice auto: the model's own calls are parsed from its reply")

    @model_validator(mode="after")
    def _one_input(self):
        if bool(self.messages) == (self.prompt is not None):
            raise ValueError("a turn has either messages (chat) or a prompt (completion)")
        if self.prompt is not None and self.session_id is not None and namespace(self.session_id) != "private":
            raise ValueError("a completion has no session")
        return self

    @field_validator("session_id", "fork_from")
    @classmethod
    def _public(cls, v: str | None) -> str | None:
        if v is not None and namespace(v) == "private":
            raise ValueError("a worker's private session cannot be named in a turn")
        return v

    @property
    def affinity(self) -> str | None:
        """The session whose worker should run the turn: the parent a fork copies, else its own."""
        return self.fork_from or self.session_id


@dataclass(frozen=True, slots=True)
class StartEvent:
    prompt_tokens: int  # the whole history, as the cache has now seen it
    prefilled: int  # what this turn computed (not served from the cache)
    type: ClassVar[str] = "start"


# One token's logprob for the client: (its text, logprob, its UTF-8 bytes, ((alternative, logprob), ...))
TokenLogprob = tuple[str, float, tuple[int, ...], tuple[tuple[str, float], ...]]


@dataclass(frozen=True, slots=True)
class PromptEvent:
    text: str  # the prompt as the model saw it (token ids decoded)
    tokens: tuple[str, ...]  # each prompt token's text
    logprobs: tuple[TokenLogprob | None, ...] = ()  # when asked for; the first token has none
    type: ClassVar[str] = "prompt"


@dataclass(frozen=True, slots=True)
class TokenEvent:
    text: str
    index: int = 0  # the choice (n > 1)
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens behind this text, when asked for
    type: ClassVar[str] = "token"


@dataclass(frozen=True, slots=True)
class EndEvent:
    finish_reason: str  # "stop", "length", or "tool_calls" (auto_tools: calls were parsed)
    completion_tokens: int
    index: int = 0
    tool_calls: tuple[tuple[str, str], ...] = ()  # auto_tools: (name, arguments JSON) in order
    content: str = ""  # auto_tools with calls: the reply's text outside them
    type: ClassVar[str] = "end"


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    error: HttpError  # the answer, from the one table (cluster/http_errors.py)
    type: ClassVar[str] = "error"


Event = StartEvent | PromptEvent | TokenEvent | EndEvent | ErrorEvent


class TurnBackend(Protocol):
    """What the router serves through. Failures of the backend itself (a worker lost, a store
    down) are raised as LessServeErrors (cluster/http_errors.py answers them); what a worker
    refuses arrives as an ErrorEvent."""

    def turn(self, req: TurnRequest, *, stream: bool) -> AsyncIterator[Event]:
        """The turn's events; the first is a StartEvent or an ErrorEvent. Nothing is delivered until
        the turn is committed (streamed: its first token; not streamed: all of it), so a worker
        lost before then is replaced without the caller seeing it."""
        ...

    async def session_info(self, session_id: str, owner: str) -> dict | None:
        """{"id", "worker", "node", "tier", "tokens_seen", ...}; None for a session this owner lacks."""
        ...

    async def delete_session(self, session_id: str, owner: str) -> bool:
        """Forget the session everywhere; False if it did not exist for this owner."""
        ...
