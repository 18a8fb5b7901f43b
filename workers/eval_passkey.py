"""Passkey retrieval: a 5-digit key hidden at a depth of filler text, asked for at the end with a
plain completion prompt (no chat template), answered greedily."""

from __future__ import annotations

import random
import re
import time

from lessserve.workers.eval_common import EngineFactory
from lessserve.workers.report import progress

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


def eval_passkey(factory: EngineFactory, policies: list[str], budgets: list[int], lengths: list[int],
                 trials_per_depth: int = 1, seed: int = 0) -> list[dict]:
    tok = factory.tokenizer
    rng = random.Random(seed)
    cases = {L: [(d, rng.randint(10000, 99999)) for d in DEPTHS for _ in range(trials_per_depth)] for L in lengths}
    prompts = {L: [(build_prompt(tok, L, d, k), k) for d, k in cs] for L, cs in cases.items()}
    runs = [(p, b) for p in policies for b in (budgets if p != "full" else [budgets[0]])]
    rows = []
    for i, (policy, budget) in enumerate(runs):
        engine = factory.make(policy, budget)
        for L in lengths:
            t0, hits = time.time(), 0
            for ids, key in prompts[L]:
                slot = engine.alloc()
                try:
                    out = list(engine.generate(slot, ids, 8))
                finally:
                    engine.free(slot)
                hits += answer_ok(tok, out, key)
            row = {"policy": policy, "budget": engine.spec.budget if policy != "full" else max(lengths),
                   "length": L, "accuracy": hits / len(prompts[L]), "trials": len(prompts[L])}
            rows.append(row)
            progress(f"[{i + 1}/{len(runs)}] {policy:12s} budget={row['budget']:5d} length={L:5d} "
                     f"acc={row['accuracy']:.2f} ({time.time() - t0:.0f}s)")
    return rows
