"""`lessserve bench soak`: a bounded mixed multi-turn load against the embedded cluster (local Ray,
a private redis-server on loopback) for a set time, with Redis faults optional, while the RSS of
the router and worker processes is sampled. Reports turns, 5xx and 503 counts, TTFT percentiles
and the RSS growth after warm-up (goal: within +10%).

Users run conversations of a few turns (half of them streamed through the same endpoint), then
start a new one; a 503 is retried after its Retry-After. Bounded by `duration_s` and `max_turns`.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import psutil

from lessserve.bench.result import BenchResult, Plot
from lessserve.bench.serve_load import TurnFailed, _percentile, _turn, user_script
from lessserve.lab.output import progress

ROLES = {"router": "Router", "worker": "LessWorker"}  # process title fragments of the Serve replicas


def serve_rss_mb() -> dict[str, float]:
    """RSS (MB) of this process's Serve replicas, summed per role."""
    out = dict.fromkeys(ROLES, 0.0)
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            for role, mark in ROLES.items():
                if "ServeReplica" in cmd and mark in cmd:
                    out[role] += p.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


async def _users(url: str, model: str, users: int, turns: int, max_tokens: int, deadline: float, max_turns: int,
                 seed: int, tally: dict) -> None:
    rng = random.Random(seed)

    async def user(i: int, client: httpx.AsyncClient):
        conv = 0
        while time.perf_counter() < deadline and tally["turns"] < max_turns:
            sid, msgs = f"soak-{seed}-{i}-{conv}", []
            for q in user_script(rng, turns):
                msgs.append({"role": "user", "content": q[:400]})
                ok = False
                while not ok and time.perf_counter() < deadline:
                    try:
                        text, ttft, _ = await _turn(client, url, model, msgs, sid, max_tokens, {})
                        ok = True
                    except TurnFailed as e:
                        tally[f"http_{e.status}"] = tally.get(f"http_{e.status}", 0) + 1
                        if e.status != 503:
                            tally.setdefault("first_error", str(e))
                            await asyncio.sleep(1.0)
                            break
                        await asyncio.sleep(e.retry_after or 1.0)
                    except httpx.HTTPError:
                        tally["transport_errors"] += 1
                        await asyncio.sleep(1.0)
                if not ok:  # past the deadline, or an error a retry cannot mend: next conversation
                    break
                msgs.append({"role": "assistant", "content": text})
                tally["turns"] += 1
                if ttft is not None:
                    tally["ttft"].append(ttft)
            conv += 1

    async with httpx.AsyncClient(timeout=httpx.Timeout(300)) as client:
        await asyncio.gather(*(user(i, client) for i in range(users)))


async def _faults(redis, every_s: float, down_s: float, deadline: float, log: list) -> None:
    """Kill Redis every `every_s` for `down_s`, coming back alternately from its AOF and empty."""
    n = 0
    while time.perf_counter() + every_s + down_s < deadline:
        await asyncio.sleep(every_s)
        redis.kill()
        log.append((time.perf_counter(), "redis killed"))
        await asyncio.sleep(down_s)
        empty = n % 2 == 1
        await asyncio.to_thread(redis.restart, empty)
        log.append((time.perf_counter(), "redis back " + ("empty" if empty else "from its AOF")))
        n += 1


async def host_tier_mb(base_url: str) -> float:
    """Bytes the workers' host tiers hold (from /metrics): memory the config bounds (store.host_bytes)."""
    async with httpx.AsyncClient(timeout=10) as c:
        text = (await c.get(base_url + "/metrics")).text
    for line in text.splitlines():
        if line.startswith('lessserve_tier_bytes{tier="host"}'):
            return float(line.split()[-1]) / 2**20
    return 0.0


async def _sample(base_url: str, every_s: float, deadline: float, t0: float, rows: list) -> None:
    """RSS per role, and the workers' RSS less their host tiers (what must stay flat)."""
    while time.perf_counter() < deadline:
        rss = serve_rss_mb()
        try:
            host = await host_tier_mb(base_url)
        except httpx.HTTPError:
            host = 0.0
        t = round(time.perf_counter() - t0, 1)
        rows += [{"t_s": t, "process": role, "rss_mb": round(mb, 1)} for role, mb in rss.items()]
        rows.append({"t_s": t, "process": "worker minus host tier", "rss_mb": round(rss["worker"] - host, 1)})
        await asyncio.sleep(every_s)


def growth(rows: list[dict], role: str, warmup_s: float) -> float | None:
    """RSS at the end over the first sample after warm-up, minus 1."""
    pts = [r["rss_mb"] for r in rows if r["process"] == role and r["t_s"] >= warmup_s and r["rss_mb"] > 0]
    return pts[-1] / pts[0] - 1 if len(pts) >= 2 else None


def run_soak(duration_s: float, users: int, turns: int, max_tokens: int, max_turns: int, port: int, seed: int,
             faults: bool, fault_every_s: float, sample_s: float, warmup_s: float, workers: int = 1,
             overrides: dict | None = None) -> BenchResult:
    from lessserve.cluster import launch
    from lessserve.cluster.config import load_config
    from lessserve.testing.local_redis import LocalRedis

    redis = LocalRedis(persist=True).start()
    cfg = load_config(overrides={"port": port, "store.redis_url": redis.url, "worker_num_cpus": 0.5,
                                 "router_num_cpus": 0.1, "maintain_interval_s": 2.0, "workers.min_workers": workers,
                                 "workers.max_workers": workers, **(overrides or {})})
    progress("soak: starting the cluster ...")
    try:
        launch.start(cfg)  # stops Ray itself when it fails half-way
    except BaseException:
        redis.stop()
        raise
    tally = {"turns": 0, "transport_errors": 0, "ttft": []}
    samples, fault_log = [], []

    async def main():
        t0 = time.perf_counter()
        deadline = t0 + duration_s
        base = f"http://127.0.0.1:{port}"
        tasks = [_users(base + "/v1/chat/completions", cfg.model_name, users, turns, max_tokens, deadline, max_turns,
                        seed, tally), _sample(base, sample_s, deadline, t0, samples)]
        if faults:
            tasks.append(_faults(redis, fault_every_s, min(10.0, fault_every_s / 2), deadline, fault_log))
        await asyncio.gather(*tasks)
        return t0, time.perf_counter() - t0

    try:
        t0, wall = asyncio.run(main())
    finally:
        launch.stop()
        redis.stop()
    fives = sum(v for k, v in tally.items() if k.startswith("http_5") and k != "http_503")
    summary = [{"turns": tally["turns"], "wall_s": round(wall, 1), "turns_per_s": tally["turns"] / wall,
                "http_5xx_not_503": fives, "http_503": tally.get("http_503", 0),
                "http_4xx": sum(v for k, v in tally.items() if k.startswith("http_4")),
                "transport_errors": tally["transport_errors"],
                "ttft_p50_s": _percentile(tally["ttft"], 0.5), "ttft_p99_s": _percentile(tally["ttft"], 0.99),
                "router_rss_growth": growth(samples, "router", warmup_s),
                "worker_rss_growth": growth(samples, "worker", warmup_s),
                "worker_minus_host_tier_growth": growth(samples, "worker minus host tier", warmup_s)}]
    notes = [f"fault at {t - t0:.0f} s: {what}" for t, what in fault_log]
    if "first_error" in tally:
        notes.append(f"first non-503 error: {tally['first_error']}")
    meta = {"users": users, "turns per conversation": turns, "duration_s": duration_s, "faults": faults,
            "workers": workers}
    return BenchResult("soak", samples, meta, plot=Plot("t_s", "rss_mb", "process", "RSS of the Serve replicas"),
                       summary=summary, notes=notes)
