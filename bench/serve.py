"""`lessserve bench serve`: one multi-turn chat load against several serving configurations, side
by side in one run, same model, threads and dtype, every loop bounded in count and time:

- `sessions`: the product: compressed session slots (the policy, e.g. h2o+less at budget 128),
  fewer device slots than live sessions (the host tier holds the rest: offload and restore run),
  prefill in large chunks through the fast path, only each turn's new tokens prefilled. Its device
  slots (`session_slots`) are as many as fit the KV memory of the baselines' slots and more:
  a compressed slot is ~30x smaller than a full one, which is the point of the design; its KV
  bytes (device + host) are in the JSON beside theirs and never exceed them;
- `recompute`: no session cache: every turn prefills its whole history in one full-attention SDPA
  forward (full policy, prefill_chunk = max_context: no chunk interleaving), then decodes;
- `paged`: the full-KV competitor at equal device KV bytes: a paged full-KV cache (vLLM / SGLang:
  16-token blocks, bench/paged_kv.py) whose block pool has the bytes of the `sessions`
  configuration's device slots; sessions keep their blocks between turns, whole idle sessions are
  evicted LRU when the pool is full, and an evicted session's next turn recomputes its history
  (bench/paged_sessions.py). A turn longer than the pool is refused (`refused_turns`);
- `paged_large`: the same paged cache with the full-policy baselines' KV bytes (`slots` full slots of
  `max_context` tokens): a full-KV server given the memory the recompute server has;
- `paged_fp8`, `paged_large_fp8` (not run by default): the same two pools storing K/V in fp8
  (vLLM's `--kv-cache-dtype fp8`, scale 1.0): 1 byte per element, so 4x the blocks of fp32 in the
  same bytes: the fair competitor for quantised session slots at equal KV bytes;
- `full_sessions` (not run by default: superseded by the paged configurations): the full policy with
  session ids and fixed max_context slots, LRU, evicted caches recomputed from the transcript.

The configurations run the worker's own serving path in process (BatchScheduler; SessionStore, or
bench/paged_sessions.py for the paged cache; the calls cluster/worker.py makes per turn, a slot gate
like its TurnGate) without Ray or HTTP, whose cost is the same for all of them.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from lessserve.bench.result import BenchResult
from lessserve.bench.serve_load import _percentile
from lessserve.cluster.metrics import TokenTimer
from lessserve.errors.tree import ConfigError, RequestError
from lessserve.lab.output import progress

COLUMNS = ["config", "policy", "kv_bits", "kv_dtype", "budget", "turns", "refused_turns", "turns_per_s", "tokens_per_s",
           "ttft_p50_s", "ttft_p99_s",
           "itl_p50_s", "itl_p99_s", "sessions_held", "sessions_held_max", "device_slots", "kv_blocks",
           "kv_bytes_per_session", "kv_bytes", "sessions_per_GB", "restores", "recomputes", "evictions",
           "mean_history_tokens", "abandoned_turns", "prefill_tokens", "prefill_tokens_per_s", "decode_batch_mean",
           "decode_step_ms"]

CONFIGS = ("sessions", "recompute", "paged", "paged_large", "full_sessions", "paged_fp8", "paged_large_fp8")
DEFAULT_CONFIGS = ("sessions", "recompute", "paged", "paged_large")
# paged configuration -> (whose byte budget its pool gets: a key of run_serve's paged_bytes, its K/V storage
# dtype: None = the model's)
PAGED = {"paged": ("paged", None), "paged_large": ("paged_large", None),
         "paged_fp8": ("paged", "float8_e4m3fn"), "paged_large_fp8": ("paged_large", "float8_e4m3fn")}
WORDS = ("river stone market window garden letter music winter harbor forest candle bridge story "
         "morning engine silver island paper orchard lantern").split()


@dataclass
class Workload:
    users: int = 8
    turns: int = 8
    rate: float = 1.0  # user arrivals per second (Poisson)
    first_words: int = 900  # the first message: a pasted document (~1.2k tokens)
    words_median: float = 60.0  # later messages: log-normal words, long tail, capped at 6x the median
    short_tokens: int = 16
    long_tokens: int = 64
    long_share: float = 0.3  # share of turns with a long reply
    seed: int = 0

    def scripts(self) -> tuple[list[list[tuple[str, int]]], list[float]]:
        """Per user: (message, reply tokens) per turn; and the users' arrival times."""
        rng = random.Random(self.seed)
        out = []
        for _ in range(self.users):
            turns = []
            for t in range(self.turns):
                n = self.first_words if t == 0 else \
                    max(3, min(int(6 * self.words_median), int(rng.lognormvariate(0, 0.8) * self.words_median)))
                words = " ".join(rng.choice(WORDS) for _ in range(n))
                reply = self.long_tokens if rng.random() < self.long_share else self.short_tokens
                turns.append((("Read this and keep it in mind: " if t == 0 else "Tell me about ") + words + ".",
                              reply))
            out.append(turns)
        starts, t = [], 0.0
        for _ in range(self.users):
            t += rng.expovariate(self.rate)
            starts.append(t)
        return out, starts


async def drive(ss, sched, slots: int, load: Workload, use_sessions: bool, time_limit_s: float, tag: str,
                held: Callable[[], int] | None = None) -> dict:
    """Every user's turns through the worker's per-turn calls; at most `slots` turns at once (the
    rest wait, as behind the worker's TurnGate). A turn still running at the time limit is
    abandoned and not counted; a turn the server refuses (a RequestError: too long for it) ends its
    user's conversation and is counted. `held()`: sessions cached now, read after every turn."""
    from lessserve.workers.scheduler import SamplingParams

    tok = ss.engine.tokenizer
    special = tuple(tok.all_special_ids)
    scripts, starts = load.scripts()
    gate = asyncio.Semaphore(slots)
    ttfts, itls, hist = [], [], []
    done = refused = generated = held_max = 0
    deadline = time.perf_counter() + time_limit_s

    async def user(i: int):
        nonlocal done, refused, generated, held_max
        await asyncio.sleep(starts[i])
        msgs: list[dict] = []
        for k, (q, reply_tokens) in enumerate(scripts[i]):
            if time.perf_counter() > deadline:
                return
            msgs.append({"role": "user", "content": q})
            sid = f"{tag}-{i}" if use_sessions else f"{tag}-{i}-turn{k}"
            timer, tokens = TokenTimer(time.perf_counter()), []
            async with gate:
                try:
                    async with ss.turn(sid, msgs, reply_tokens) as (session, new_ids, tokens):
                        hist.append(len(session.transcript.ids))
                        # exactly reply_tokens of text in every configuration (the special ids are masked, as
                        # vLLM's min_tokens does), so the history the client sends back is what the cache holds
                        params = SamplingParams(max_new_tokens=reply_tokens, temperature=0.0, stop_ids=special,
                                                min_tokens=reply_tokens)
                        async for _ in sched.generate(session.slot, new_ids, params, tokens):
                            timer.tick()
                except RequestError:
                    refused += 1
                    return
                finally:
                    itls.extend(timer.itls)  # also a turn the time limit cut
                    if not use_sessions:
                        await ss.delete(sid)
            msgs.append({"role": "assistant", "content": tok.decode(tokens, skip_special_tokens=True)})
            ttfts.append(timer.ttft)
            done += 1
            generated += len(tokens)
            if held is not None:
                held_max = max(held_max, held())

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(user(i)) for i in range(load.users)]
    _, pending = await asyncio.wait(tasks, timeout=time_limit_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - t0
    sched.wait_idle(60)
    return {"turns": done, "refused_turns": refused, "wall_s": wall, "turns_per_s": done / wall,
            "tokens_per_s": generated / wall, "sessions_held_max": held_max, "abandoned_turns": len(pending),
            "ttft_p50_s": _percentile(ttfts, 0.5), "ttft_p99_s": _percentile(ttfts, 0.99),
            "itl_p50_s": _percentile(itls, 0.5), "itl_p99_s": _percentile(itls, 0.99),
            "mean_history_tokens": statistics.fmean(hist) if hist else 0.0}


def run_config(name: str, engine_cfg, store_cfg, load: Workload, use_sessions: bool, time_limit_s: float,
               checkpoint, tokenizer, model, threads: int) -> tuple[dict, object]:
    from lessserve.workers.engine import Engine
    from lessserve.workers.scheduler import BatchScheduler
    from lessserve.workers.session_store import SessionStore

    engine = Engine(engine_cfg, checkpoint=checkpoint, tokenizer=tokenizer, model=model)
    steps = StepStats()
    sched = BatchScheduler(engine, threads=threads)
    ss = SessionStore(engine, store_cfg, run_local=sched.run_exclusive)

    async def measure():
        await warm_up(ss, sched)
        sched.on_step = steps.add  # the timed part only
        # sessions cached in the device and host tiers (a len() of each LRU: safe off the scheduler thread)
        held_now = (lambda: sum(len(lru) for lru in ss.store.lru.values())) if use_sessions else None
        res = await drive(ss, sched, engine_cfg.max_slots, load, use_sessions, time_limit_s, name, held_now)
        held = [sid for sid in list(ss.sessions) if sid.startswith(name) and await _cached(ss, sid)]
        return res, await ss.stats(), len(held)

    try:
        res, st, held = asyncio.run(measure())
    finally:
        sched.close()
        asyncio.run(ss.close())
    row = {"config": name, "policy": engine.policy.name, "kv_bits": engine.slab.kv_bits,
           "budget": engine.spec.budget, **res, "sessions_held": held, "device_slots": engine_cfg.max_slots,
           "kv_bytes_per_session": engine.slab.slot_bytes(),
           "restores": sum(t.get("restores") or 0 for k, t in st.items() if k != "total"),
           "recomputes": st["total"]["recomputes"], "evictions": st["total"]["dropped"], **steps.row()}
    return row, engine


def run_paged(name: str, base, kv_bytes: int, chunk: int, load: Workload, time_limit_s: float,
              threads: int, kv_dtype: str | None = None) -> tuple[dict, object]:
    """The paged full-KV cache over `kv_bytes` of blocks (the engine `base`'s model; K/V stored in
    `kv_dtype`, default the model's), driven like the others; no slot gate: the pool's blocks bound
    the turns in flight (bench/paged_sessions.py)."""
    from lessserve.bench.paged_kv import PagedConfig, PagedEngine
    from lessserve.bench.paged_sessions import PagedSessions
    from lessserve.workers.scheduler import BatchScheduler

    engine = PagedEngine(base, PagedConfig(kv_bytes=kv_bytes, prefill_chunk=chunk, kv_dtype=kv_dtype))
    steps = StepStats()
    sched = BatchScheduler(engine, threads=threads)
    ss = PagedSessions(engine, run_local=sched.run_exclusive)

    async def measure():
        try:
            await warm_up(ss, sched)
        except RequestError:  # a pool smaller than the warm-up turn: it will refuse the load's turns too
            progress(f"== {name}: the pool cannot hold even the warm-up turn")
        await sched.run_exclusive(ss.reset_counts)  # the warm-up turn is not the load's
        sched.on_step = steps.add
        res = await drive(ss, sched, load.users, load, True, time_limit_s, name, ss.held)
        return res, await ss.stats()

    try:
        res, st = asyncio.run(measure())
    finally:
        sched.close()
    pool, held = engine.pool, st["sessions_held"]
    row = {"config": name, "policy": engine.policy_name, "kv_dtype": str(pool.kv_dtype).removeprefix("torch."),
           **res, "sessions_held": held,
           "sessions_held_max": st["sessions_held_max"], "kv_blocks": pool.num_blocks,
           "kv_bytes_per_session": st["bytes_used"] // held if held else 0, "kv_bytes": pool.total_bytes,
           "restores": 0, "recomputes": st["recomputes"], "evictions": st["evictions"], **steps.row()}
    return row, engine


@dataclass
class StepStats:
    """Where the scheduler thread's time went (its on_step hook): prefill and decode steps."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0

    def add(self, kind: str, tokens: int, seconds: float) -> None:
        if kind == "prefill":
            self.prefill_tokens += tokens
            self.prefill_s += seconds
        else:
            self.decode_steps += 1
            self.decode_tokens += tokens
            self.decode_s += seconds

    def row(self) -> dict:
        return {"prefill_tokens": self.prefill_tokens, "prefill_s": self.prefill_s,
                "prefill_tokens_per_s": self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0,
                "decode_s": self.decode_s, "decode_batch_mean": self.decode_tokens / max(1, self.decode_steps),
                "decode_step_ms": 1e3 * self.decode_s / max(1, self.decode_steps)}


async def warm_up(ss, sched) -> None:
    """One short untimed turn (prefill chunk and decode), so one-time initialisation is not
    charged to the configuration's first turns; its session is deleted."""
    from lessserve.workers.scheduler import SamplingParams

    msgs = [{"role": "user", "content": "Hello there, a short warm-up."}]
    async with ss.turn("warmup", msgs, 2) as (session, new_ids, tokens):
        async for _ in sched.generate(session.slot, new_ids, SamplingParams(max_new_tokens=2, stop_ids=()), tokens):
            pass
    await ss.delete("warmup")


async def _cached(ss, sid: str) -> bool:
    """The session's cache is held in a tier (device or host), not only its transcript."""
    from lessserve.cache_store.errors import CacheMissError

    try:
        await ss.store.where(sid)
        return True
    except CacheMissError:
        return False


def slot_bytes(cfg, shared: dict) -> int:
    """Bytes of one device slot of configuration `cfg` (a one-slot engine, then let go)."""
    from lessserve.workers.engine import Engine

    return Engine(cfg.model_copy(update={"max_slots": 1}), **shared).slab.slot_bytes()


def run_serve(policy: str, budget: int, load: Workload, slots: int, time_limit_s: float, chunk: int,
              max_context: int, threads: int = 0, model: str | None = None,
              session_slots: int | None = None, configs: tuple[str, ...] = DEFAULT_CONFIGS,
              compile: bool = False, kv_bits: str = "native") -> BenchResult:
    """`slots`: device slots (concurrent turns) of the full-policy configurations; `session_slots`
    (default `slots`): the sessions configuration's, which must fit in no more KV memory than theirs.
    `configs`: which of CONFIGS run (sessions always: the ratios are its). `compile`: the sessions
    configuration's engine with its compile switch on (the full policy is never compiled); `kv_bits`:
    its slot format (the full-KV baselines keep the engine's dtype, as vLLM's default does, except
    the `_fp8` paged ones). The paged pools get the sessions configuration's device KV bytes
    (`paged`, `paged_fp8`) and the full slots' (`paged_large`, `paged_large_fp8`), in whole 16-token
    blocks of their storage dtype."""
    if "sessions" not in configs or not set(configs) <= set(CONFIGS):
        raise ConfigError(f"--configs must name sessions and only {', '.join(CONFIGS)}; got {', '.join(configs)}")
    from lessserve.cache_store.config import StoreConfig
    from lessserve.workers.config import EngineConfig
    from lessserve.workers.engine import Engine
    from lessserve.workers.model_loader import load_checkpoint
    from lessserve.workers.threads import reserve_compute_threads

    threads = reserve_compute_threads(threads)  # every step runs on the scheduler thread
    base = EngineConfig(**({"model": model} if model else {}))
    ckpt = load_checkpoint(base.model)
    first = Engine(base.model_copy(update={"max_slots": 1, "policy": "full", "max_context": 64}), checkpoint=ckpt)
    shared = dict(checkpoint=ckpt, tokenizer=first.tokenizer, model=first.model)  # one model for every config
    rows = []
    # sessions: every session fits in device + host memory; nothing idles out during the run
    session_slots = session_slots or slots
    sess_cfg = base.model_copy(update={"policy": policy, "budget": budget, "max_slots": session_slots,
                                       "prefill_chunk": chunk, "compile": compile, "kv_bits": kv_bits})
    slot_c = slot_bytes(sess_cfg, shared)
    host_c = load.users * slot_c
    full_cfg = base.model_copy(update={"policy": "full", "max_context": max_context, "max_slots": slots,
                                       "prefill_chunk": min(max_context, 8192)})
    full_c = slot_bytes(full_cfg, shared)
    if session_slots * slot_c + host_c > slots * full_c:
        raise ConfigError(f"the sessions configuration's KV memory ({session_slots} slots + host "
                          f"{host_c} bytes) would exceed the baselines' ({slots} full slots of {max_context} "
                          "tokens): give it fewer --session-slots, or the baselines more --slots / --max-context")
    plans = [
        ("sessions", sess_cfg, StoreConfig(host_bytes=host_c, device_idle_s=None, host_idle_s=None), True),
        ("recompute", full_cfg, StoreConfig(host_bytes=0, device_idle_s=None, host_idle_s=None), False),
        # full KV with LRU: its device slots, plus a host tier of the sessions configuration's whole KV bytes
        ("full_sessions", full_cfg, StoreConfig(host_bytes=host_c + session_slots * slot_c, device_idle_s=None,
                                                host_idle_s=None), True),
    ]
    paged_bytes = {"paged": session_slots * slot_c, "paged_large": slots * full_c}
    for name in (c for c in CONFIGS if c in configs):
        if name in PAGED:
            sized, kv_dtype = PAGED[name]
            progress(f"== {name}: full KV in 16-token blocks ({kv_dtype or 'model dtype'}) over "
                     f"{paged_bytes[sized]:,} bytes, chunk {full_cfg.prefill_chunk} ...")
            row, engine = run_paged(name, first, paged_bytes[sized], full_cfg.prefill_chunk, load, time_limit_s,
                                    threads, kv_dtype)
            row["kv_budget_bytes"] = paged_bytes[sized]
        else:
            _, ecfg, scfg, use_sessions = next(p for p in plans if p[0] == name)
            progress(f"== {name}: {ecfg.policy}, {ecfg.max_slots} device slots, chunk {ecfg.prefill_chunk} ...")
            row, engine = run_config(name, ecfg, scfg, load, use_sessions, time_limit_s, threads=threads, **shared)
            row["kv_bytes"] = ecfg.max_slots * row["kv_bytes_per_session"] + (scfg.host_bytes if use_sessions else 0)
        kv = row["kv_bytes"]
        held = row["sessions_held"]
        row["sessions_per_GB"] = held / (kv / 1e9) if held else 0.0
        rows.append(row)
        progress(f"== {name}: {row['turns']} turns ({row['refused_turns']} refused), {row['turns_per_s']:.3f} "
                 f"turns/s, ttft p50 {row['ttft_p50_s']:.2f}s p99 {row['ttft_p99_s']:.2f}s")
        del engine
    by = {r["config"]: r for r in rows}
    s = by["sessions"]
    notes = []
    for other in (c for c in CONFIGS[1:] if c in by):
        o = by[other]
        tr = s["turns_per_s"] / o["turns_per_s"] if o["turns_per_s"] else float("nan")
        p99 = o["ttft_p99_s"] / s["ttft_p99_s"] if s["ttft_p99_s"] else float("nan")
        s[f"turns_per_s_ratio_vs_{other}"] = tr
        s[f"ttft_p99_ratio_vs_{other}"] = p99
        if not o["turns"]:
            notes.append(f"sessions vs {other}: {other} served no turn ({o['refused_turns']} refused: too long for "
                         f"its {o['kv_bytes']:,} KV bytes)")
            continue
        notes.append(f"sessions vs {other}: turns/s {tr:.2f}x, p99 TTFT " +
                     (f"{p99:.2f}x lower" if p99 >= 1 else f"{1 / p99:.2f}x higher"))
    meta = {"device": str(first.device), "dtype": str(first.dtype).removeprefix("torch."), "model": first.model_id,
            "torch threads": threads, "users": load.users, "turns": load.turns, "rate": load.rate,
            "device slots (sessions / full policy)": f"{session_slots} / {slots}",
            "paged KV bytes (paged / paged_large)": f"{paged_bytes['paged']:,} / {paged_bytes['paged_large']:,}",
            "replies": f"{load.short_tokens}/{load.long_tokens} tokens ({load.long_share:.0%} long)",
            "time limit per config s": time_limit_s, "sessions compiled": compile}
    return BenchResult("serve", rows, meta, columns=COLUMNS, notes=notes, figure=draw)


COLORS = {"sessions": "tab:green", "recompute": "tab:red", "paged": "tab:blue", "paged_large": "tab:purple",
          "full_sessions": "tab:orange", "paged_fp8": "tab:cyan", "paged_large_fp8": "tab:pink"}


def draw(rows: list[dict], path) -> None:
    """Completed turns/s and p99 TTFT per configuration, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
    for ax, key, label in ((axes[0], "turns_per_s", "completed turns/s (higher is better)"),
                           (axes[1], "ttft_p99_s", "p99 TTFT s (lower is better)")):
        ax.bar(names, [r[key] for r in rows], color=[COLORS.get(n, "tab:gray") for n in names])
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
