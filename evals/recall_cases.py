"""Multi-turn recall conversations: a fact stated at an early turn, filler turns of the shared texts,
and the question at the last turn (issue 27, item 1). Torch-free: only a tokenizer is needed.

A case is a list of user messages; every earlier assistant message is the fixed acknowledgement ACK,
as a client resends its whole history each turn (OpenAI style). Two turn formats:
- `chat`: the model's own chat template; the last user message asks the question.
- `plain`: PLAIN_TEMPLATE renders "User: ...\\nAssistant: ..." lines, and the last turn ends with an
  assistant message the model continues (the answer cue, "The access code is"): a completion prompt in
  the style of evals/passkey_prompts.QUESTION, which the default 135M model answers with a full cache.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

ACK = "Noted."
FORMATS = ("plain", "chat")
ANSWER_TOKENS = 12  # greedy tokens of the answer; the history plus these fit the requested length
MIN_TURNS, MAX_TURNS = 4, 20
TOKENS_PER_TURN = 48  # fewest filler tokens a turn gets when choosing how many turns a length has

# The plain format: role-labelled lines; a final assistant message is left open for the model to continue.
PLAIN_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ 'User: ' + m['content'] + '\\n' }}"
    "{%- else -%}{{ 'Assistant: ' + m['content'] }}{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{ 'Assistant:' }}{%- endif -%}"
)

NAMES = ("Marguerite", "Bartholomew", "Ingrid", "Thaddeus", "Rosalind", "Evangeline", "Cornelius", "Octavia",
         "Leopold", "Philippa", "Ignatius", "Winifred", "Augustin", "Clementine", "Percival", "Seraphina")
ADJECTIVES = ("silver", "quiet", "golden", "broken", "hidden", "frozen", "crimson", "gentle", "hollow", "bright")
NOUNS = ("lantern", "harbor", "violin", "meadow", "compass", "orchard", "feather", "mirror", "garden", "anchor")


@dataclass(frozen=True)
class FactKind:
    """One kind of fact: how its value is drawn, stated, asked for and cued."""

    name: str
    draw: Callable[[random.Random], str]
    statement: str  # "{v}" is the value
    question: str
    cue: str  # the plain format's answer prefix
    numeric: bool


KINDS = (
    FactKind("passkey", lambda r: str(r.randint(10000, 99999)),
             "The access code is {v}. Remember it. {v} is the access code.", "What is the access code?",
             "The access code is", True),
    FactKind("name", lambda r: r.choice(NAMES),
             "The code name is {v}. Remember it. {v} is the code name.", "What is the code name?",
             "The code name is", False),
    FactKind("number", lambda r: str(r.randint(100, 9999)),
             "The locker number is {v}. Remember it. {v} is the locker number.", "What is the locker number?",
             "The locker number is", True),
    FactKind("phrase", lambda r: f"{r.choice(ADJECTIVES)} {r.choice(NOUNS)}",
             "The secret phrase is {v}. Remember it. {v} is the secret phrase.", "What is the secret phrase?",
             "The secret phrase is", False),
)
KIND_BY_NAME = {k.name: k for k in KINDS}


@dataclass
class RecallCase:
    """One conversation: `fillers[t]` is user turn t's corpus text; the fact opens turn `fact_turn`;
    the last turn (`turns - 1`) asks the question."""

    kind: str
    answer: str
    fact: str  # the fact sentence (dropped for the floor)
    fact_turn: int
    fillers: list[str]
    text: str  # which shared text the fillers come from
    tokens: int = 0  # the rendered history up to the answer (the format's template)
    distance_tokens: int = 0  # tokens from the end of the fact's turn to the end of the question
    extra: dict = field(default_factory=dict)

    @property
    def turns(self) -> int:
        return len(self.fillers) + 1

    @property
    def question_turn(self) -> int:
        return self.turns - 1


def user_text(case: RecallCase, t: int, floor: bool = False) -> str:
    """User message t: the fact (unless `floor`) before the turn's filler; the question last."""
    if t == case.question_turn:
        return KIND_BY_NAME[case.kind].question
    if t == case.fact_turn and not floor:
        return f"{case.fact} {case.fillers[t]}"
    return case.fillers[t]


def messages_at(case: RecallCase, t: int, fmt: str, floor: bool = False) -> list[dict]:
    """The whole history a client sends at turn t: user messages 0..t, fixed ACKs in between, and
    for the plain format's question turn the open answer cue."""
    msgs: list[dict] = []
    for u in range(t + 1):
        if u:
            msgs.append({"role": "assistant", "content": ACK})
        msgs.append({"role": "user", "content": user_text(case, u, floor)})
    if fmt == "plain" and t == case.question_turn:
        msgs.append({"role": "assistant", "content": KIND_BY_NAME[case.kind].cue})
    return msgs


def rendered_tokens(tokenizer, messages: list[dict]) -> int:
    """Tokens of the prompt the session path builds for `messages` (tokenizer's chat template)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_ok(answer: str, case: RecallCase) -> bool:
    """The fact appears in the answer: digit runs for numbers (thousands separators ignored),
    case-insensitive words otherwise."""
    if KIND_BY_NAME[case.kind].numeric:
        return case.answer in re.findall(r"\d+", answer.replace(",", ""))
    words = " ".join(re.findall(r"[a-z0-9]+", answer.lower()))
    return re.search(rf"\b{re.escape(case.answer.lower())}\b", words) is not None


def turns_for(length: int, rng: random.Random) -> int:
    """How many turns a history of `length` tokens has: 4-20, at least TOKENS_PER_TURN filler each."""
    hi = max(MIN_TURNS, min(MAX_TURNS, length // TOKENS_PER_TURN))
    return rng.randint(MIN_TURNS, hi)


def _stream(tokenizer, text: str, start: int, tokens: int) -> list[int]:
    """About `tokens` + slack token ids of `text` from character `start` on (wrapping round)."""
    chars = 6 * tokens + 400
    chunk = (text[start:] + "\n" + text)[:chars]
    return tokenizer(chunk, add_special_tokens=False)["input_ids"]


def _fill(tokenizer, stream: list[int], counts: list[int]) -> list[str]:
    """Consecutive slices of `stream` of the given token counts, as stripped text."""
    out, at = [], 0
    for n in counts:
        out.append(" ".join(tokenizer.decode(stream[at : at + n]).split()))
        at += n
    return out


def build_case(tokenizer, kind: FactKind, rng: random.Random, length: int, texts: dict[str, str], fmt: str,
               tolerance: int = 8) -> RecallCase:
    """A conversation whose rendered history plus ANSWER_TOKENS is `length` tokens or up to
    `tolerance` fewer (never more: `length` may be the model's whole context): filler counts are
    spread over the turns and corrected from measurement, aiming at the middle of that window."""
    value = kind.draw(rng)
    turns = turns_for(length, rng)
    fact_turn = rng.randint(0, (turns - 2) // 2)  # the early half; at least one filler turn follows
    name = rng.choice(sorted(texts))
    text = texts[name]
    stream = _stream(tokenizer, text, rng.randrange(max(1, len(text) - 7 * length)), length)
    target = length - ANSWER_TOKENS
    n = turns - 1
    counts = [max(1, (target - 16 * turns) // n)] * n
    case = RecallCase(kind.name, value, kind.statement.format(v=value), fact_turn, [], name)
    for _ in range(10):
        case.fillers = _fill(tokenizer, stream, counts)
        case.tokens = rendered_tokens(tokenizer, messages_at(case, case.question_turn, fmt))
        if 0 <= target - case.tokens <= tolerance:
            break
        step = target - tolerance // 2 - case.tokens
        for i in range(n):  # spread the correction, the remainder on the last filler turns
            counts[i] = max(1, counts[i] + step // n + (i >= n - step % n))
    else:
        raise ValueError(f"no conversation of {length} tokens fits within {tolerance} (history {case.tokens})")
    before = rendered_tokens(tokenizer, messages_at(case, fact_turn, fmt))
    case.distance_tokens = case.tokens - before
    return case


def recall_cases(tokenizer, lengths: list[int], cases: int, seed: int, texts: dict[str, str],
                 fmt: str = "plain") -> dict[int, list[RecallCase]]:
    """{length: cases}: drawn with random.Random(seed), lengths in order, fact kinds in turn.
    `texts`: name -> the part of a shared text the fillers come from. Every policy sees these."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    rng = random.Random(seed)
    return {L: [build_case(tokenizer, KINDS[k % len(KINDS)], rng, L, texts, fmt) for k in range(cases)]
            for L in lengths}


def question_prompt(tokenizer, case: RecallCase, fmt: str = "plain") -> tuple[list[int], int]:
    """The question turn's whole prompt as token ids (the tokenizer's chat template) and `cut`, where
    the question turn's new tokens start: ids[:cut] is the history a session had consumed before
    the question existed (through the last acknowledgement), the part a question-agnostic peer may
    compress (evals/peer_kvpress.py, `--task recall`)."""
    msgs = messages_at(case, case.question_turn, fmt)

    def ids(m: list[dict], gen: bool) -> list[int]:
        text = tokenizer.apply_chat_template(m, add_generation_prompt=gen, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full, before = ids(msgs, True), ids(msgs[: 2 * case.question_turn], False)
    cut = next((i for i, (a, b) in enumerate(zip(full, before, strict=False)) if a != b), min(len(full), len(before)))
    return full, cut
