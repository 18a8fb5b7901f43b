"""A turn's sampled tokens as the protocol's events: every choice's text (detokenized, cut at its
stop strings), its logprobs for the client, its end; the prompt's tokens and logprobs when a
completion echoes it. The worker's one generation loop (cluster/worker.py) runs through here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from lessserve.cluster.protocol import EndEvent, Event, PromptEvent, TokenEvent, TokenLogprob, TurnRequest
from lessserve.workers.constraints import Constraint
from lessserve.workers.engine import Engine
from lessserve.workers.reply import Reply
from lessserve.workers.sampling import PromptLogprobs, TopLogprobs
from lessserve.workers.scheduler import BatchScheduler, SamplingParams
from lessserve.workers.tool_parsers import parser_for


class TokenTexts:
    """Token ids -> the text and bytes a client sees in `logprobs` (memoised: a vocabulary is small)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._bytes: dict[int, bytes] = {}

    def bytes_of(self, token: int) -> bytes:
        if (b := self._bytes.get(token)) is None:
            b = self._bytes[token] = self.engine.grammars.token_bytes(token)
        return b

    def text(self, token: int) -> str:
        return self.bytes_of(token).decode("utf-8", errors="replace")

    def logprob(self, token: int, lp: float, top: TopLogprobs) -> TokenLogprob:
        return self.text(token), lp, tuple(self.bytes_of(token)), tuple((self.text(t), v) for t, v in top)


def sampling_params(engine: Engine, req: TurnRequest, constraint: Constraint | None,
                    forks: list[int]) -> SamplingParams:
    return SamplingParams(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                          stop_ids=engine.stop_ids, logprobs=req.logprobs, prompt_logprobs=req.prompt_logprobs,
                          constraint=constraint, forks=tuple(forks))


async def choice_events(engine: Engine, scheduler: BatchScheduler, texts: TokenTexts, req: TurnRequest, slot: int,
                        ids: list[int], params: SamplingParams, tokens: list[int],
                        marks: dict[int, Callable[[], None]]) -> AsyncIterator[Event]:
    """Prefill `ids` into `slot` and stream every choice; `tokens` receives choice 0's tokens (the
    session keeps that one). A choice ends at a stop token, a stop string (the scheduler stops just
    that choice), its grammar's end or max_tokens."""
    n, stop_ids = 1 + len(params.forks), set(engine.stop_ids)
    replies = [Reply(engine.tokenizer, engine.stop_ids, req.stop) for _ in range(n)]
    generated, ended, texts_of = [0] * n, set(), [[] for _ in range(n)]
    parser = parser_for(engine.tokenizer.chat_template) if req.auto_tools else None

    def end(i: int, finish: str, count: int) -> EndEvent:
        if parser is not None:
            content, calls = parser.parse("".join(texts_of[i]))
            if calls:
                return EndEvent("tool_calls", count, i, tuple(calls), content)
        return EndEvent(finish, count, i)

    if req.echo:
        prompt_text = engine.tokenizer.decode(ids, skip_special_tokens=False)
        if req.prompt_logprobs is None:
            yield PromptEvent(prompt_text, tuple(texts.text(t) for t in ids))
    async for item in scheduler.generate(slot, ids, params, tokens, marks, stopped=ended):
        if isinstance(item, PromptLogprobs):
            lps = tuple(None if lp is None else texts.logprob(t, lp, top)
                        for t, lp, top in zip(ids, item.logprobs, item.top, strict=True))
            yield PromptEvent(prompt_text, tuple(texts.text(t) for t in ids), lps)
            continue
        i = item.index
        if i in ended:  # sampled before the scheduler saw the stop
            continue
        generated[i] += 1
        piece, done = replies[i].push(item.token)
        lps = (texts.logprob(item.token, item.logprob, item.top),) \
            if item.logprob is not None and item.token not in stop_ids else ()
        if piece or lps:
            texts_of[i].append(piece)
            yield TokenEvent(piece, i, lps)
        if done:
            ended.add(i)
            yield end(i, replies[i].finish, generated[i] - (item.token in stop_ids))
            if len(ended) == n:
                break
    for i in sorted(set(range(n)) - ended):  # max_tokens or its grammar's end (a complete answer: "stop")
        if tail := replies[i].flush():
            texts_of[i].append(tail)
            yield TokenEvent(tail, i)
        yield end(i, "length" if generated[i] >= req.max_tokens else "stop", generated[i])
