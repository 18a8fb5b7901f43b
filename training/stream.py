"""The streaming per-layer stage of `train-less`: every layer's LESS weights, for one or several
policies at once, trained from a stream of train windows with one frozen forward per window.

Per window (training/stream_data.py gives it from the cursor, nothing is written to disk):
  capture   one forward of the frozen model keeps every layer's q, k, v and full attention output
  evict     per layer and policy, the engine's eviction replayed (capture.eviction_chunks)
  prepare   the LayerBatch of a seeded subset of query chunks (stream_prep.sparse_batch)
  train     one Adam step per layer and policy (Adam persistent per layer and policy) on
            layer.projected_mse(layer.less_output(...)), dropout as in train_layer
The learning rate warms up, then decays by a cosine to a floor over the planned tokens
(StreamConfig.lr_at). Every `eval_every` windows the projected MSE on fixed dev windows is
computed per layer and policy; each layer keeps its best-by-dev weights (window 0 = the initial
weights), and those are the output.

Run directory: checkpoint.pt (all state needed to continue, written to a temporary file and
renamed), log.jsonl (one record per evaluation) and exports/<policy>-t<tokens>.safetensors. The
randomness of window w (its query chunks, its dropout) is seeded from (seed, w): a run resumed
from any checkpoint ends with the weights of an uninterrupted run, bit for bit.

    python -m lessserve.training.stream export RUN_DIR/checkpoint.pt --policy h2o --out FILE [--current]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from lessserve.errors.tree import ConfigError
from lessserve.kernels.reference.lowrank import LessLayerWeights
from lessserve.lab.output import progress_bar
from lessserve.training.capture import eviction_chunks
from lessserve.training.config import StreamConfig, stream_flag
from lessserve.training.data import Corpus, dev_blocks
from lessserve.training.layer import LayerBatch, evaluate, init_weights, less_output, projected_mse
from lessserve.training.stream_data import Window, WindowStream, derived_seed
from lessserve.training.stream_prep import capture_layers, sparse_batch
from lessserve.workers.compression import Policy, eviction_spec
from lessserve.workers.less_weights import FIELDS, LessWeights
from lessserve.workers.model import LlamaModel

CHECKPOINT, LOG = "checkpoint.pt", "log.jsonl"
STAGES = ("capture", "evict", "prepare", "train")  # per window; "eval" and "checkpoint" are timed apart


class StreamMismatchError(ConfigError):
    """A checkpoint made with another configuration cannot be resumed by this run."""


class StreamStateError(ConfigError):
    """A checkpoint file is missing or does not hold the asked policy."""


def _snapshot(w: LessLayerWeights) -> dict[str, torch.Tensor]:
    return {f: getattr(w, f).detach().clone() for f in FIELDS}


class StreamRun:
    """The state of one streaming run (weights, optimisers, best-by-dev, cursor, log) and its steps."""

    def __init__(self, model: LlamaModel, cfg: StreamConfig, device: torch.device, meta: dict | None = None):
        self.model, self.cfg, self.device = model, cfg, device
        a = model.args
        self.L = a.num_layers
        self.specs = {p: eviction_spec(Policy.parse(p), cfg.budget, cfg.recent, cfg.sink, max_context=1 << 30)
                      for p in cfg.policies}
        start = (cfg.budget // cfg.chunk) * cfg.chunk  # whole chunks of queries past the budget
        self.pool = torch.arange(start // cfg.chunk, cfg.seq_len // cfg.chunk)  # [n] trainable query chunks
        self.o_proj = [blk.self_attn.o_proj.weight.detach().float() for blk in model.model.layers]  # [hidden, Hq*D]
        self.weights: dict[str, list[LessLayerWeights]] = {}
        self.opts: dict[str, list[torch.optim.Adam]] = {}
        for p in cfg.policies:
            self.weights[p] = []
            for i in range(self.L):
                gen = torch.Generator().manual_seed(cfg.seed * 100003 + i)  # train_one's init, per layer
                w = init_weights(a.num_heads, a.num_kv_heads, a.head_dim, cfg.rank, cfg.hidden, gen).to(device)
                for t in vars(w).values():
                    t.requires_grad_(True)
                self.weights[p].append(w)
            self.opts[p] = [torch.optim.Adam(list(vars(w).values()), lr=cfg.lr) for w in self.weights[p]]
        self.best = {p: [{"loss": math.inf, "window": 0, "weights": _snapshot(w)} for w in self.weights[p]]
                     for p in cfg.policies}
        self.sparse: dict[str, list[float]] = {}
        self.cursor, self.pass_ = 0, 0
        self.train_loss = {p: [0.0] * self.L for p in cfg.policies}  # summed since the last evaluation
        self.train_n = 0
        self.log: list[dict] = []
        self.seconds = dict.fromkeys((*STAGES, "eval", "checkpoint"), 0.0)
        self.meta = {**(meta or {}), "num_layers": self.L, "num_heads": a.num_heads,
                     "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim}
        self._rng_devices = [device.index or 0] if device.type == "cuda" else []

    # ---- timing -------------------------------------------------------------------------------
    @contextmanager
    def timed(self, stage: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[stage] += time.perf_counter() - t0

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"config": self.cfg.model_dump(), "cursor": self.cursor, "pass": self.pass_, "meta": self.meta,
                "weights": {p: [_snapshot(w) for w in ws] for p, ws in self.weights.items()},
                "opt": {p: [o.state_dict() for o in os_] for p, os_ in self.opts.items()},
                "best": self.best, "sparse": self.sparse, "train_loss": self.train_loss, "train_n": self.train_n,
                "log": self.log, "seconds": self.seconds}

    def load_state_dict(self, st: dict) -> None:
        for p in self.cfg.policies:
            for w, saved, opt, o_st in zip(self.weights[p], st["weights"][p], self.opts[p], st["opt"][p], strict=True):
                with torch.no_grad():
                    for f in FIELDS:
                        getattr(w, f).copy_(saved[f])
                opt.load_state_dict(o_st)
        self.best = {p: [{**b, "weights": {f: t.to(self.device) for f, t in b["weights"].items()}}
                         for b in st["best"][p]] for p in self.cfg.policies}
        self.sparse, self.train_loss, self.train_n = st["sparse"], st["train_loss"], st["train_n"]
        self.cursor, self.pass_, self.log, self.seconds = st["cursor"], st["pass"], st["log"], st["seconds"]

    def save(self, path: Path) -> None:
        with self.timed("checkpoint"):
            tmp = path.with_suffix(".tmp")
            torch.save(self.state_dict(), tmp)
            tmp.replace(path)

    # ---- one window ---------------------------------------------------------------------------
    def picks(self, window: int) -> list[torch.Tensor]:
        """Query chunk ids [Cq] each layer trains on at this window (seeded by the window; shared by policies)."""
        n = self.cfg.query_chunks
        if not 0 < n < len(self.pool):
            return [self.pool] * self.L
        gen = torch.Generator().manual_seed(derived_seed("query-chunks", self.cfg.seed, window))
        return [self.pool[torch.randperm(len(self.pool), generator=gen)[:n]].sort().values for _ in range(self.L)]

    def train_window(self, win: Window) -> None:
        cfg, w = self.cfg, self.cursor
        with self.timed("capture"):
            cap = capture_layers(self.model, win.tokens[None])  # L x {q, k, v, o}
        lr, picks = cfg.lr_at(w), self.picks(w)
        with torch.random.fork_rng(devices=self._rng_devices):
            torch.manual_seed(derived_seed("dropout", cfg.seed, w))
            for i in range(self.L):
                layer = cap[i]
                for p in cfg.policies:
                    with self.timed("evict"):
                        e = eviction_chunks(layer["q"], layer["k"], layer["v"], self.specs[p], cfg.chunk)  # [1,Hkv,T]
                    with self.timed("prepare"):
                        b = sparse_batch(layer, e, cfg.chunk, picks[i])
                    with self.timed("train"):
                        self.train_loss[p][i] += self._step(p, i, b, lr)
                cap[i] = {}  # free this layer's capture
        self.cursor, self.pass_ = w + 1, win.pass_
        self.train_n += 1

    def _step(self, p: str, i: int, b: LayerBatch, lr: float) -> float:
        opt = self.opts[p][i]
        for g in opt.param_groups:
            g["lr"] = lr
        loss = projected_mse(less_output(b, self.weights[p][i], self.cfg.dropout), b.o_full, self.o_proj[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    # ---- dev ----------------------------------------------------------------------------------
    def dev_chunks(self, i: int) -> torch.Tensor:
        n = self.cfg.dev_query_chunks
        if not 0 < n < len(self.pool):
            return self.pool
        gen = torch.Generator().manual_seed(derived_seed("dev-chunks", self.cfg.seed, i))
        return self.pool[torch.randperm(len(self.pool), generator=gen)[:n]].sort().values

    @torch.no_grad()
    def dev_batches(self, seqs: torch.Tensor) -> dict[str, list[LayerBatch]]:
        """dev windows [M, T] -> per policy, per layer, the LayerBatch of all M windows. Each field is
        allocated once for all M windows and filled window by window (no per-window copies left behind);
        k, v, q and o_full are shared by the policies."""
        M, pols = len(seqs), self.cfg.policies
        bufs: list[dict] = [{} for _ in range(self.L)]  # layer -> field -> [M, ...] (policy fields: (p, field))

        def put(i: int, key, j: int, t: torch.Tensor) -> None:
            if key not in bufs[i]:
                bufs[i][key] = torch.empty((M, *t.shape[1:]), dtype=t.dtype, device=t.device)
            bufs[i][key][j:j + 1] = t

        with progress_bar(total=M, desc="dev windows", unit="win", leave=False) as bar:
            for j in range(M):
                cap = capture_layers(self.model, seqs[j:j + 1])
                for i, layer in enumerate(cap):
                    for p in pols:
                        e = eviction_chunks(layer["q"], layer["k"], layer["v"], self.specs[p], self.cfg.chunk)
                        b = sparse_batch(layer, e, self.cfg.chunk, self.dev_chunks(i))
                        for f in ("e", "o_sparse", "lse"):
                            put(i, (p, f), j, getattr(b, f))
                    for f in ("k", "v", "q", "o_full"):
                        put(i, f, j, getattr(b, f))
                    bufs[i]["q_chunk"] = b.q_chunk
                    cap[i] = {}
                bar.update(1)
        return {p: [LayerBatch(k=bf["k"], v=bf["v"], e=bf[(p, "e")], q=bf["q"], o_sparse=bf[(p, "o_sparse")],
                               lse=bf[(p, "lse")], o_full=bf["o_full"], q_chunk=bf["q_chunk"]) for bf in bufs]
                for p in pols}

    def evaluate(self, dev: dict[str, list[LayerBatch]]) -> dict:
        """Dev loss per policy and layer; updates the best-by-dev weights; -> the log record."""
        with self.timed("eval"):
            if not self.sparse:
                self.sparse = {p: [evaluate(dev[p][i], None, self.o_proj[i], 2) for i in range(self.L)]
                               for p in self.cfg.policies}
            dev_rec = {}
            for p in self.cfg.policies:
                losses = [evaluate(dev[p][i], self.weights[p][i], self.o_proj[i], 2) for i in range(self.L)]
                for i, loss in enumerate(losses):
                    if loss < self.best[p][i]["loss"]:
                        self.best[p][i] = {"loss": loss, "window": self.cursor,
                                           "weights": _snapshot(self.weights[p][i])}
                best = [b["loss"] for b in self.best[p]]
                dev_rec[p] = {"mean": _mean(losses), "ratio": _ratio(losses, self.sparse[p]),
                              "best_mean": _mean(best), "best_ratio": _ratio(best, self.sparse[p]), "layers": losses}
        T = self.cfg.seq_len
        rec = {"window": self.cursor, "tokens": self.cursor * T,
               "tokens_per_policy": dict.fromkeys(self.cfg.policies, self.cursor * T), "pass": self.pass_,
               "lr": self.cfg.lr_at(max(self.cursor - 1, 0)) if self.cursor else 0.0, "dev": dev_rec,
               "train": {p: _mean(v) / max(self.train_n, 1) if self.train_n else None
                         for p, v in self.train_loss.items()},
               "throughput": throughput(self.seconds, self.cursor * T)}
        if self.cursor == 0:
            rec["sparse"] = {p: {"mean": _mean(v), "layers": v} for p, v in self.sparse.items()}
        self.train_loss = {p: [0.0] * self.L for p in self.cfg.policies}
        self.train_n = 0
        self.log.append(rec)
        return rec

    def brief(self) -> str:
        r = self.log[-1] if self.log else {}
        dev = " ".join(f"{p} {v['best_ratio']:.3f}" for p, v in r.get("dev", {}).items())
        tps = throughput(self.seconds, self.cursor * self.cfg.seq_len)["tokens_per_s"]["overall"]
        return f"{tps:.0f} tok/s, lr {self.cfg.lr_at(self.cursor):.2g}, best dev/sparse {dev}"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _ratio(losses: list[float], sparse: list[float]) -> float:
    """Mean over layers of loss / sparse-only loss."""
    return _mean([x / s for x, s in zip(losses, sparse, strict=True)])


def throughput(seconds: dict[str, float], tokens: int) -> dict:
    """tokens/s per stage (each stage's own time) and overall (all time, evaluation and checkpoints included)."""
    tps = {s: round(tokens / seconds[s], 1) if seconds.get(s) else None for s in STAGES}
    total = sum(seconds.values())
    tps["overall"] = round(tokens / total, 1) if total else 0.0
    return {"tokens_per_s": tps, "seconds": {k: round(v, 2) for k, v in seconds.items()}}


# ---- output ---------------------------------------------------------------------------------------
def weights_of(st: dict, policy: str, which: str = "best") -> LessWeights:
    """LessWeights of one policy from a run's state (StreamRun.state_dict() or a checkpoint):
    `best` = the best-by-dev weights per layer (the output), `current` = the latest step's."""
    cfg = st["config"]
    if policy not in cfg["policies"]:
        raise StreamStateError(f"this run trained {','.join(cfg['policies'])}, not {policy}")
    T = cfg["seq_len"]
    tensors = [b["weights"] for b in st["best"][policy]] if which == "best" else st["weights"][policy]
    layers = [LessLayerWeights(**{f: t[f].detach().float().cpu() for f in FIELDS}) for t in tensors]
    last = next((r for r in reversed(st["log"]) if r["window"] <= st["cursor"]), None)
    stats = []
    for i, b in enumerate(st["best"][policy]):
        s = {"layer": i, "sparse_val_loss": st["sparse"][policy][i]}
        if which == "best":
            s.update(val_loss=b["loss"], best_window=b["window"], best_tokens=b["window"] * T)
        else:
            s.update(val_loss=last["dev"][policy]["layers"][i] if last and last["window"] == st["cursor"] else None)
        stats.append(s)
    vals = [s["val_loss"] for s in stats if s["val_loss"] is not None]
    manifest = {
        **st["meta"], "model": cfg["model"], "policy": policy, "budget": cfg["budget"], "rank": cfg["rank"],
        "hidden": cfg["hidden"], "seed": cfg["seed"], "chunk": cfg["chunk"], "recent": cfg["recent"],
        "sink": cfg["sink"], "lr": cfg["lr"], "query_chunks": cfg["query_chunks"], "dropout": cfg["dropout"],
        "seq_len": T, "qkv_source": "full", "masks": "replay of the engine's chunked eviction",
        "stage": "per-layer-stream", "weights": "best dev loss per layer" if which == "best" else "current",
        "schedule": {"tokens": cfg["tokens"], "windows": cfg["tokens"] // T, "warmup": cfg["warmup"],
                     "lr_floor": cfg["lr_floor"], "decay": "cosine"},
        "policies_trained_together": cfg["policies"], "eval_every": cfg["eval_every"],
        "dev_seqs_per_text": cfg["dev_seqs"], "dev_query_chunks": cfg["dev_query_chunks"],
        "data_sha256": cfg["data_sha256"], "dev_sha256": cfg["dev_sha256"],
        "tokens": {"per_layer": st["cursor"] * T}, "windows": st["cursor"], "passes": st["pass"] + 1,
        "dev": {"mean": _mean(vals), "sparse_mean": _mean(st["sparse"][policy]),
                "ratio": _mean([s["val_loss"] / s["sparse_val_loss"] for s in stats if s["val_loss"] is not None])},
        "throughput": throughput(st["seconds"], st["cursor"] * T), "layers": stats,
    }
    return LessWeights(layers, manifest)


def load_state(path: Path) -> dict:
    if not Path(path).is_file():
        raise StreamStateError(f"no streaming checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def export(checkpoint: Path, policy: str, out: Path, which: str = "best") -> LessWeights:
    """Write one policy's weights from a checkpoint (at the tokens it had seen) as .safetensors + .json."""
    w = weights_of(load_state(checkpoint), policy, which)
    out.parent.mkdir(parents=True, exist_ok=True)
    w.save(out)
    return w


def check_same(saved: dict, cfg: StreamConfig, path: Path) -> None:
    now = cfg.model_dump()
    for f, v in now.items():
        if f not in StreamConfig.SAVING and saved.get(f) != v:
            raise StreamMismatchError(f"{stream_flag(f)}: the checkpoint {path} was made with {f} = {saved.get(f)!r}, "
                                      f"this run has {v!r}; resume with the same settings or start over without "
                                      f"--resume")


# ---- the run --------------------------------------------------------------------------------------
def train_stream(model: LlamaModel, train: Corpus, dev: Corpus, cfg: StreamConfig, run_dir: Path,
                 resume: bool = False, device: torch.device | str = "cpu", meta: dict | None = None,
                 stop_after: int | None = None) -> dict[str, LessWeights]:
    """Train (or, with `resume`, continue) the run in `run_dir`; -> the best-by-dev weights per policy.
    `stop_after` ends the run after that many windows in all, with a checkpoint, as an interruption would."""
    device = torch.device(device)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    run_dir.mkdir(parents=True, exist_ok=True)
    ck, log_path = run_dir / CHECKPOINT, run_dir / LOG
    run = StreamRun(model, cfg, device, meta)
    if resume and ck.is_file():
        st = load_state(ck)
        check_same(st["config"], cfg, ck)
        run.load_state_dict(st)
        print(f"resumed the streaming stage at window {run.cursor}/{cfg.windows} ({run.cursor * cfg.seq_len:,} "
              f"tokens)", file=sys.stderr)
    else:
        ck.unlink(missing_ok=True)
    log_path.write_text("".join(json.dumps(r) + "\n" for r in run.log))
    stream = WindowStream(train, cfg.seq_len, cfg.seed)
    with run.timed("eval"):
        dev_b = run.dev_batches(dev_blocks(dev, cfg.seq_len, cfg.dev_seqs)[0])

    def record(rec: dict) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    if not run.log:
        record(run.evaluate(dev_b))
    stop = cfg.windows if stop_after is None else min(stop_after, cfg.windows)
    desc = f"LESS stream {'+'.join(cfg.policies)} b{cfg.budget}"
    with progress_bar(total=cfg.windows, initial=run.cursor, desc=desc, unit="win") as bar:
        bar.set_postfix_str(run.brief())
        while run.cursor < stop:
            run.train_window(stream.window(run.cursor))
            w = run.cursor
            if w % cfg.eval_every == 0 or w == cfg.windows:
                record(run.evaluate(dev_b))
            if w % cfg.checkpoint_every == 0 or w == stop:
                run.save(ck)
            if cfg.export_every and w % cfg.export_every == 0:
                st = run.state_dict()
                (run_dir / "exports").mkdir(exist_ok=True)
                for p in cfg.policies:
                    weights_of(st, p).save(run_dir / "exports" / f"{p}-t{w * cfg.seq_len}.safetensors")
            bar.set_postfix_str(run.brief())
            bar.update(1)
    st = run.state_dict()
    return {p: weights_of(st, p) for p in cfg.policies}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lessserve.training.stream", description="streaming-stage tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write one policy's weights from a checkpoint (.safetensors + .json)")
    ex.add_argument("checkpoint")
    ex.add_argument("--policy", choices=["h2o", "lambda"], required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--current", action="store_true", help="the latest step's weights, not the best-by-dev ones")
    a = ap.parse_args(argv)
    try:
        w = export(Path(a.checkpoint), a.policy, Path(a.out), "current" if a.current else "best")
    except ConfigError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    print(f"{a.out}: {a.policy}, {w.manifest['tokens']['per_layer']:,} tokens per layer, dev/sparse "
          f"{w.manifest['dev']['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
