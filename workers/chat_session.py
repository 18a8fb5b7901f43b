"""Multi-turn chat over one engine slot: only new tokens are prefilled each turn.

The transcript (token ids fed to the model, the rendered text they stand for, and the chat
messages) is small and is what lets a lost cache be rebuilt by re-prefilling. A client may
resend the whole history (OpenAI style): if its rendering extends what the cache has consumed,
only the suffix is prefilled; if it diverges (an edited earlier message), the slot is reset and
the new history prefilled from scratch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from tokenizers.decoders import DecodeStream

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


def render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def plan_turn(tokenizer, transcript: Transcript, messages: list[dict]) -> TurnPlan:
    text = render(tokenizer, messages)
    if transcript.ids and len(text) > len(transcript.text) and text.startswith(transcript.text):
        return TurnPlan(False, encode(tokenizer, text[len(transcript.text):]), text)
    return TurnPlan(True, encode(tokenizer, text), text)


class Detokenizer:
    """Incremental decode of a reply: the text of `tokenizer.decode(ids, skip_special_tokens=True)`,
    piece by piece, never half a UTF-8 character (it is held back until it completes).

    tokenizers' `DecodeStream` decodes only a window of the last few ids per token, so a token costs
    the same at the end of a long reply as at its start. A tokenizer without a `tokenizers` backend,
    or whose `decode` cleans up spaces over the whole text, is decoded whole again for every token."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else backend
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []  # only without a backend
        self.sent = 0

    def push(self, token: int) -> str:
        if self.backend is None:
            return self._push_whole(token)
        try:
            return self.stream.step(self.backend, token) or ""
        except Exception as e:  # tokenizers raises a bare Exception
            if not str(e).startswith("Invalid prefix encountered"):
                raise
        # byte-fallback bytes that are not UTF-8 decode differently once more bytes follow, which
        # breaks the stream's prefix: start again at this token (what vLLM does too)
        self.stream = DecodeStream(skip_special_tokens=True)
        return self.stream.step(self.backend, token) or ""

    def _push_whole(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece


class StopStrings:
    """OpenAI `stop`: streamed text ends before the first stop string, which is never sent. Text
    that could still turn into a stop string is held back until it cannot."""

    def __init__(self, stops: list[str]):
        self.stops = [x for x in stops if x]
        self.hold = max((len(x) for x in self.stops), default=1) - 1
        self.buf = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """-> (text safe to send now, whether a stop string was hit)."""
        if not self.stops:
            return piece, False
        self.buf += piece
        cut = min((i for i in (self.buf.find(x) for x in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf = self.buf[:cut], ""
            return out, True
        n = max(len(self.buf) - self.hold, 0)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class ChatSession:
    """One conversation bound to an engine slot (CLI chat, tests, and the cluster's workers)."""

    def __init__(self, engine: Engine, slot: int | None = None, transcript: Transcript | None = None):
        self.engine = engine
        self.slot = engine.alloc() if slot is None else slot
        self.transcript = transcript or Transcript()
        self.last_prefill = 0  # tokens prefilled by the latest turn
        self.rebuilt = 0  # tokens re-prefilled from the transcript before it (a lost cache)

    def close(self) -> None:
        self.engine.free(self.slot)

    def stats(self) -> dict:
        return {**self.engine.stats(self.slot), "turns": self.transcript.turns}

    def begin_turn(self, messages: list[dict], plan: TurnPlan | None = None) -> list[int]:
        """Plan a turn: reset the slot if the history diverged; return the ids to prefill."""
        tr = self.transcript
        plan = plan or plan_turn(self.engine.tokenizer, tr, messages)
        if plan.rebuild:
            self.engine.slab.reset(self.slot)
            tr.ids, tr.text = [], ""
        self.last_prefill = len(plan.new_ids)
        tr.ids += plan.new_ids
        tr.text = plan.prompt_text
        return plan.new_ids

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

    def turn(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """Run one assistant turn for the full message history; yields text pieces."""
        gen: list[int] = []
        yield from stream_reply(self, self.begin_turn(messages), gen, max_new_tokens, temperature, top_p, seed)
        self.finish_turn(messages, gen)


def stream_reply(chat: ChatSession, new_ids: list[int], gen: list[int], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
    """Prefill `new_ids` into the session's slot and generate with Engine.generate (no scheduler):
    every sampled token is appended to `gen` (also when the consumer stops early); yields text."""
    tok = chat.engine.tokenizer
    detok = Detokenizer(tok)
    for t in chat.engine.generate(chat.slot, new_ids, max_new_tokens, temperature, top_p,
                                  stop_ids=chat.engine.stop_ids, seed=seed):
        gen.append(t)
        if t not in chat.engine.stop_ids:
            yield detok.push(t)
