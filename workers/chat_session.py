"""Multi-turn chat over one engine slot: only new tokens are prefilled each turn.

The transcript (token ids fed to the model, the rendered text they stand for, and the chat
messages) is small and is what lets a lost cache be rebuilt by re-prefilling. A client may
resend the whole history (OpenAI style): if its rendering extends what the cache has consumed,
only the suffix is prefilled; if it diverges (an edited earlier message), the slot is reset and
the new history prefilled from scratch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lessserve.workers.engine import Engine


@dataclass
class Transcript:
    ids: list[int] = field(default_factory=list)  # every token the cache has consumed
    text: str = ""  # the rendered chat text those ids stand for
    messages: list[dict] = field(default_factory=list)
    turns: int = 0
    owner: str | None = None  # who may continue this conversation (an API key's hash; None = anyone)

    def to_dict(self) -> dict:
        return {"ids": self.ids, "text": self.text, "messages": self.messages, "turns": self.turns, "owner": self.owner}

    @classmethod
    def from_dict(cls, d: dict) -> Transcript:
        return cls(ids=list(d["ids"]), text=d["text"], messages=list(d["messages"]), turns=int(d["turns"]),
                   owner=d.get("owner"))


@dataclass
class TurnPlan:
    rebuild: bool  # the cache must be reset and `new_ids` is the whole history
    new_ids: list[int]
    prompt_text: str


class ChatMessages(list):
    """A conversation's messages and the function tools its chat template renders with them
    (`tools`, OpenAI's function definitions; None: no tools). A list, so every path that takes
    messages takes these unchanged."""

    def __init__(self, messages, tools: list[dict] | None = None):
        super().__init__(messages)
        self.tools = tools


def supports_tools(tokenizer) -> bool:
    """The chat template renders `tools` (Qwen2.5/3, Llama 3.1+, Mistral, Hermes templates do)."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def render(tokenizer, messages: list[dict]) -> str:
    tools = getattr(messages, "tools", None)
    if tools:
        return tokenizer.apply_chat_template(list(messages), tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def plan_turn(tokenizer, transcript: Transcript, messages: list[dict]) -> TurnPlan:
    text = render(tokenizer, messages)
    if transcript.ids and len(text) > len(transcript.text) and text.startswith(transcript.text):
        return TurnPlan(False, encode(tokenizer, text[len(transcript.text):]), text)
    return TurnPlan(True, encode(tokenizer, text), text)


class ChatSession:
    """One conversation bound to an engine slot, as a SessionStore holds it."""

    def __init__(self, engine: Engine, slot: int | None = None, transcript: Transcript | None = None):
        self.engine = engine
        self.slot = engine.alloc() if slot is None else slot
        self.transcript = transcript or Transcript()
        self.last_prefill = 0  # tokens prefilled by the latest turn
        self.before: Transcript | None = None  # the transcript as it was when the open turn began
        # a rebuild or a new session from a shared prompt: transcript ids the slot has not consumed yet,
        # prefilled by the next turn's request ahead of its own ids (chunked, never in one go)
        self.pending: list[int] = []
        self.marks: dict[int, Callable[[], None]] = {}  # offsets into the next turn's ids -> fn (BatchScheduler)

    def close(self) -> None:
        self.engine.free(self.slot)

    def stats(self) -> dict:
        return {**self.engine.stats(self.slot), "turns": self.transcript.turns}

    def begin_turn(self, messages: list[dict], plan: TurnPlan | None = None) -> list[int]:
        """Plan a turn: reset the slot if the history diverged; return the ids to prefill (what is
        pending from a rebuild first, then the turn's new ids)."""
        tr = self.transcript
        plan = plan or plan_turn(self.engine.tokenizer, tr, messages)
        if plan.rebuild:
            self.engine.slab.reset(self.slot)
            tr.ids, tr.text, self.pending, self.marks = [], "", [], {}
        self.last_prefill = len(plan.new_ids)
        tr.ids += plan.new_ids
        tr.text = plan.prompt_text
        if self.pending:  # a chunk ends where the rebuilt history does: the slot a replay of it gives
            self.marks.setdefault(len(self.pending), lambda: None)
        ids, self.pending = self.pending + plan.new_ids, []
        return ids

    def finish_turn(self, messages: list[dict], gen: list[int]) -> str:
        """Record a finished turn. generate() never feeds its last token back: the cache consumed
        gen[:-1], and the transcript records exactly that (the next turn re-supplies the rest)."""
        tok, tr = self.engine.tokenizer, self.transcript
        reply = tok.decode([t for t in gen if t not in self.engine.stop_ids], skip_special_tokens=True)
        tr.ids += gen[:-1]
        tr.text += tok.decode(gen[:-1], skip_special_tokens=False)
        tr.messages = [*messages, {"role": "assistant", "content": reply}]
        tr.turns = sum(1 for m in messages if m.get("role") == "user")  # the conversation's, from the request
        return reply
