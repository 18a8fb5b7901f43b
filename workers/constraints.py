"""Constrained decoding: a request's grammar (JSON schema, Lark, regex), enforced token by token
with llguidance (the Rust engine vLLM, SGLang and llama.cpp use for structured outputs). Chosen
over xgrammar and outlines-core because it is one dependency-free wheel, computes a step's mask in
tens of microseconds without precomputing over the vocabulary, bounds every step's work by its
parser limits (a hostile schema cannot stall the batch), and validates a grammar without a
tokenizer, so the router refuses a bad schema before a worker sees it.

A `Constraint` is one request's matcher: `mask_` removes every token the grammar forbids from the
request's logits (row [1, V]) before sampling, `accept` advances it by the sampled token. The
scheduler applies it per request inside the batched decode step; other requests never wait on it.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import numpy as np
import torch

from lessserve.errors.tree import RequestError


class GrammarError(RequestError):
    """A grammar (response_format schema, tool parameters) that cannot be compiled or enforced."""


def closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that does not say otherwise
    (xgrammar's strict mode does the same): an object ends once its properties are written, so a
    small model cannot ramble on with properties of its own invention until max_tokens."""
    if isinstance(schema, list):
        return [closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k not in ("const", "enum", "default", "examples") else v for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """A JSON schema -> llguidance grammar text (compact JSON, no free whitespace: the model cannot
    pad its answer with newlines; objects closed, `closed`). GrammarError names what is wrong."""
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    schema = closed(schema)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "whitespace_pattern": None})
    except (ValueError, TypeError) as e:
        raise GrammarError(f"the JSON schema is not valid: {e}") from None
    check_grammar(grammar)
    return grammar


def check_grammar(grammar: str) -> None:
    """GrammarError unless llguidance accepts the grammar (checked without a tokenizer)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"the schema cannot be enforced: {messages[0] if messages else 'invalid grammar'}")


ANY_JSON_OBJECT = json.dumps({"type": "object", "additionalProperties": True})


class Constraint:
    """One request's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer_vocab: int):
        self.matcher = matcher
        self.ntok = tokenizer_vocab

    def mask_(self, logits: torch.Tensor) -> None:
        """logits [1, V] (V >= the tokenizer's vocabulary; rows past it are never allowed), in place."""
        m = self.matcher
        bits = np.frombuffer(m.compute_bitmask(), dtype=np.uint8)
        if m.is_error():
            raise GrammarError(f"constrained decoding failed: {m.get_error()}")
        allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.ntok].astype(bool))  # [ntok]
        logits[0, : self.ntok].masked_fill_(~allowed, float("-inf"))
        logits[0, self.ntok :] = float("-inf")

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"constrained decoding failed: {self.matcher.get_error() or 'token rejected'}")

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more (the reply has ended)."""
        return self.matcher.is_stopped()

    def fork(self) -> Constraint:
        """An independent copy at the same position (n > 1: one per choice)."""
        return Constraint(self.matcher.deep_copy(), self.ntok)


class Grammars:
    """An engine's grammar compiler: the tokenizer's llguidance view, built on first use (about
    0.3 s for a 49k vocabulary), then one matcher per request."""

    def __init__(self, tokenizer, stop_ids: tuple[int, ...]):
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self._ll: llguidance.LLTokenizer | None = None

    def _lltok(self) -> llguidance.LLTokenizer:
        if self._ll is None:
            if self.tokenizer is None or getattr(self.tokenizer, "backend_tokenizer", None) is None:
                raise GrammarError("constrained decoding needs a tokenizer with a `tokenizers` backend; "
                                   "this model has none")
            import llguidance.hf  # imports transformers: only once a grammar or token bytes are needed

            self._ll = llguidance.hf.from_tokenizer(self.tokenizer, eos_token=list(self.stop_ids) or None)
        return self._ll

    def token_bytes(self, token: int) -> bytes:
        """A token's exact bytes (a byte-level token may be part of a UTF-8 character)."""
        try:
            return self._lltok().decode_bytes([token])
        except GrammarError:
            return self.tokenizer.decode([token]).encode()

    def constraint(self, grammar: str) -> Constraint:
        tok = self._lltok()
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the schema cannot be enforced: {matcher.get_error()}")
        return Constraint(matcher, tok.vocab_size)
