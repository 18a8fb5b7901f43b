"""Time to first token of the next turn when a session's cache is on the device, restored from
host memory, restored from Redis, rebuilt by this engine from the transcript (`rebuild`: its own
chunked compressed prefill at its serving chunk size), or recomputed the way a server without
session caches pays for it (`recompute`: one full-attention SDPA forward of the whole history and
the follow-up, same model, threads and dtype: the fair baseline); plus the restore path against
raw redis-py SET / GET of a value of the same size."""

from __future__ import annotations

import json
import statistics
import time
import uuid

import redis.asyncio as aioredis
import torch

from lessserve.bench.result import BenchResult, Plot
from lessserve.cache_store.config import StoreConfig
from lessserve.lab.output import progress
from lessserve.testing.sessions import adopt, forget_cache, snapshot
from lessserve.workers.chat_session import encode, render
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.local_sessions import LocalSessions
from lessserve.workers.model import causal_attend

PATHS = ("device", "host", "redis", "rebuild", "recompute")
FOLLOW_UP = "Summarise all of that in one line."


def history_message(tokenizer, tokens: int, text: str | None) -> dict:
    """One user message whose rendered chat prompt is `tokens` tokens long (within a few)."""
    overhead = len(encode(tokenizer, render(tokenizer, [{"role": "user", "content": ""}])))
    body = text or " ".join(f"Entry {i}: the ferry left the harbour at {i % 12 + 1} o'clock with {i * 7 % 50} "
                            f"passengers, and the keeper wrote it down." for i in range(tokens))
    ids = encode(tokenizer, body)[: max(tokens - overhead, 1)]
    return {"role": "user", "content": tokenizer.decode(ids)}


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def ttft(ss: LocalSessions, sid: str, messages: list[dict]) -> float:
    t0 = time.perf_counter()
    stream = ss.turn(sid, messages, max_new_tokens=1)
    next(stream)
    dt = time.perf_counter() - t0
    for _ in stream:
        pass
    return dt


@torch.inference_mode()
def recompute_ttft(engine: Engine, messages: list[dict]) -> float:
    """The fair recompute: render and tokenize the whole conversation, one causal SDPA forward of
    all of it through the same model (no session cache, no chunking), the first token sampled."""
    t0 = time.perf_counter()
    ids = torch.tensor([encode(engine.tokenizer, render(engine.tokenizer, messages))], device=engine.device)
    pos = torch.arange(ids.shape[1], device=engine.device)[None]
    logits = engine.model(ids, pos, causal_attend, last_only=True)
    int(logits[0, -1].argmax())
    return time.perf_counter() - t0


class RawRedis:
    """Plain redis-py asyncio SET / GET of one value (the comparison), on the same event loop as
    the store's calls (`run`), so both sides pay the same."""

    def __init__(self, url: str, nbytes: int, run):
        self.run = run
        self.client = run(self._client(url))
        self.key, self.value = f"bench:raw:{uuid.uuid4().hex[:8]}", bytes(nbytes)

    @staticmethod
    async def _client(url: str) -> aioredis.Redis:
        return aioredis.Redis.from_url(url)

    def set(self) -> float:
        t0 = time.perf_counter()
        self.run(self.client.set(self.key, self.value))
        return time.perf_counter() - t0

    def get(self) -> float:
        t0 = time.perf_counter()
        got = self.run(self.client.get(self.key))
        dt = time.perf_counter() - t0
        assert got is not None and len(got) == len(self.value)
        return dt

    def close(self) -> None:
        self.run(self.client.delete(self.key))
        self.run(self.client.aclose())


def bench_history(engine: Engine, redis_url: str, tokens: int, repeats: int, quantize: bool,
                  text: str | None) -> tuple[list[dict], dict]:
    cfg = StoreConfig(redis_url=redis_url, redis_prefix=f"bench:{uuid.uuid4().hex[:8]}", quantize=quantize,
                      device_idle_s=None, host_idle_s=None)
    ss = LocalSessions(engine, cfg)
    sid = "bench"
    try:
        progress(f"{tokens} tokens: building the history ...")
        first = [history_message(engine.tokenizer, tokens, text)]
        for _ in ss.turn(sid, first, max_new_tokens=1):
            pass
        history = len(ss.transcript(sid).ids)
        state = snapshot(ss, sid)
        follow = [*ss.transcript(sid).messages, {"role": "user", "content": FOLLOW_UP}]
        rows, sizes = [], {}
        for path in PATHS:
            times = []
            for _ in range(1 if path in ("rebuild", "recompute") else repeats):
                if path == "recompute":
                    times.append(recompute_ttft(engine, follow))
                    continue
                adopt(ss, sid, state)  # the same state before every measurement
                if path in ("host", "redis"):
                    ss.offload(sid, path)
                    sizes[path] = ss.stats()[path]["bytes"]
                elif path == "rebuild":
                    forget_cache(ss, sid)
                times.append(ttft(ss, sid, follow))
            progress(f"{tokens} tokens: {path}: {_median(times):.3f} s")
            transcript = len(json.dumps(ss.transcript(sid).to_dict()))
            nbytes = {"device": engine.slab.slot_bytes(), "rebuild": transcript, "recompute": transcript}
            rows.append({"history_tokens": history, "path": path, "ttft_s": _median(times),
                         "bytes": nbytes.get(path, sizes.get(path, 0))})
        # the offload / restore paths alone against raw redis-py of the same size, interleaved so
        # that load from other processes hits both alike
        raw = RawRedis(redis_url, sizes["redis"], ss.run)
        restores, offloads, raw_sets, raw_gets = [], [], [], []
        try:
            for _ in range(max(repeats, 3) * 5):
                adopt(ss, sid, state)
                t0 = time.perf_counter()
                ss.offload(sid, "redis")
                offloads.append(time.perf_counter() - t0)
                raw_sets.append(raw.set())
                t0 = time.perf_counter()
                ss.restore(sid)
                restores.append(time.perf_counter() - t0)
                raw_gets.append(raw.get())
        finally:
            raw.close()
        raw_set, raw_get = _median(raw_sets), _median(raw_gets)
        by = {r["path"]: r["ttft_s"] for r in rows}
        summary = {"history_tokens": history, "redis_bytes": sizes["redis"],
                   "recompute/redis": by["recompute"] / by["redis"], "recompute/host": by["recompute"] / by["host"],
                   "rebuild/redis": by["rebuild"] / by["redis"], "rebuild/recompute": by["rebuild"] / by["recompute"],
                   "restore_s": _median(restores), "raw_get_s": raw_get, "restore/raw_get": _median(restores) / raw_get,
                   "best_restore/raw_get": min(restores) / min(raw_gets),
                   "offload_s": _median(offloads), "raw_set_s": raw_set, "offload/raw_set": _median(offloads) / raw_set}
        return rows, summary
    finally:
        ss.delete(sid)
        ss.close()


def run_offload(engine_cfg: EngineConfig, histories: list[int], repeats: int, quantize: bool, text: str | None,
                redis_url: str | None = None, threads: int = 0) -> BenchResult:
    """`lessserve bench offload`: every history length through every path; a private
    redis-server on loopback unless `redis_url` names one."""
    from lessserve.testing.local_redis import LocalRedis

    if threads:
        torch.set_num_threads(threads)
    engine = Engine(engine_cfg.model_copy(update={"max_slots": 2, "max_context": max(histories) + 256}))
    server = None
    if redis_url is None:
        server = LocalRedis(persist=False).start()
        redis_url = server.url
        progress(f"private redis-server on {redis_url}")
    try:
        recompute_ttft(engine, [history_message(engine.tokenizer, 64, text)])  # warm-up, not timed
        rows, summaries = [], []
        for n in histories:
            r, s = bench_history(engine, redis_url, n, repeats, quantize, text)
            rows += r
            summaries.append(s)
    finally:
        if server:
            server.stop()
    meta = {"device": str(engine.device), "model": engine.model_id, "policy": engine.policy.name,
            "budget": engine.cfg.budget, "dtype": str(engine.dtype).removeprefix("torch."),
            "prefill_chunk": engine.cfg.prefill_chunk, "torch threads": torch.get_num_threads(), "quantize": quantize}
    notes = ["recompute: one causal SDPA forward of the whole conversation (same model, dtype, threads); "
             "rebuild: this engine's compressed re-prefill from the transcript at prefill_chunk"]
    return BenchResult("offload", rows, meta, summary=summaries, notes=notes,
                       plot=Plot("history_tokens", "ttft_s", "path", "next-turn TTFT by path", logx=True))
