"""The passkey prompts, stdlib only: importable from any environment (e.g. a peer's venv).

A 5-digit key is hidden at a depth of filler text and asked for at the end with a plain
completion prompt (no chat template)."""

from __future__ import annotations

import random
import re

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "What is the pass key? The pass key is"
DEPTHS = (0.1, 0.5, 0.9)


def build_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """A prompt of about `length` tokens with the key sentence at `depth` of the filler."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(enc(INTRO)) + len(enc(needle)) + len(enc(QUESTION))
    per = len(enc(FILLER))
    n = max(1, (length - fixed) // per)
    before = round(n * depth)
    text = INTRO + FILLER * before + needle + FILLER * (n - before) + QUESTION
    return enc(text)


def answer_ok(tokenizer, out_ids: list[int], key: int) -> bool:
    m = re.search(r"\d+", tokenizer.decode(out_ids, skip_special_tokens=True))
    return m is not None and m.group(0) == str(key)


def passkey_cases(tokenizer, lengths: list[int], trials_per_depth: int = 1,
                  seed: int = 0) -> dict[int, list[tuple[list[int], int, float]]]:
    """{length: [(prompt ids, key, depth)]}: keys drawn with random.Random(seed), lengths in order,
    then DEPTHS x trials_per_depth. Every system evaluated on the passkey task uses these cases."""
    rng = random.Random(seed)
    keys = {L: [(d, rng.randint(10000, 99999)) for d in DEPTHS for _ in range(trials_per_depth)] for L in lengths}
    return {L: [(build_prompt(tokenizer, L, d, k), k, d) for d, k in cs] for L, cs in keys.items()}


def split_question(tokenizer, ids: list[int]) -> int:
    """Where the trailing QUESTION starts in `ids`: the shortest token suffix that decodes to it
    (leading whitespace ignored). The prefix before it is the question-free context."""
    for n in range(1, len(ids)):
        if tokenizer.decode(ids[-n:]).strip() == QUESTION:
            return len(ids) - n
    raise ValueError("prompt does not end with the passkey question")
