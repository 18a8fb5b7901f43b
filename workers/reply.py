"""A reply's text from its sampled tokens, as a client sees it: decoded incrementally, ended by a
stop token (never shown) or an OpenAI stop string (never sent). The worker, `lessserve chat` /
`generate` and the tests' turn driver all turn tokens into text here."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from tokenizers.decoders import DecodeStream

from lessserve.workers.sampling import Sampled


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


class Reply:
    """Tokens -> text pieces; `finish` is "stop" once a stop token or string ended it, else "length"."""

    def __init__(self, tokenizer, stop_ids: Sequence[int], stop: Sequence[str] = ()):
        self.detok, self.stops, self.stop_ids = Detokenizer(tokenizer), StopStrings(list(stop)), set(stop_ids)
        self.finish = "length"
        self._hit = False  # a stop string ended it: what it held back is never sent

    def push(self, token: int) -> tuple[str, bool]:
        """-> (text to send now, whether the reply has ended)."""
        if token in self.stop_ids:
            self.finish = "stop"
            return "", True
        piece, self._hit = self.stops.push(self.detok.push(token))
        if self._hit:
            self.finish = "stop"
        return piece, self._hit

    def flush(self) -> str:
        """What is still held back once the tokens end (nothing after a stop string)."""
        return "" if self._hit else self.stops.flush()

    def pieces(self, tokens: Iterable[int | Sampled]) -> Iterator[str]:
        """The text of a synchronous stream of one choice (BatchScheduler.stream, or token ids),
        closed when the reply ends."""
        it = iter(tokens)
        try:
            for s in it:
                piece, done = self.push(s if isinstance(s, int) else s.token)
                if piece:
                    yield piece
                if done:
                    break
        finally:
            if hasattr(it, "close"):  # a generator: the scheduler lets go of the request
                it.close()
        if tail := self.flush():
            yield tail
