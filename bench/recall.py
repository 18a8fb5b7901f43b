"""`lessserve bench recall`: what `+recall` costs, side by side with its base policy.

  bytes   host bytes per token of history (what a session keeps off-device) in fp32 / bf16 / int8
          (+ per-token scales), with int8's and bf16's relative error measured on a real history
  ttft    a turn's time to first token with and without the recall round, on the same session,
          after histories of each length, for a question alone and for longer turns ending with it
          (the session is forked per repeat, so every repeat sees the same state); median of the repeats
  ppl     perplexity of `+recall` against its base policy on windows of the test (or dev) parts, read as a
          conversation of `turn`-token turns (each turn's last queries choose the pages, which go
          back when the turn ends; the base policy sees the same chunks), so recall's effect on
          prediction is measured too
Every row is one (measure, policy, length/text); the PNG draws TTFT against history length.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from lessserve.bench.result import BenchResult
from lessserve.bench.timer import Timer
from lessserve.kernels import ops
from lessserve.lab.corpus import corpus_paths, read_part
from lessserve.lab.engines import EngineFactory
from lessserve.lab.output import progress
from lessserve.lab.text import token_windows
from lessserve.workers.engine import Engine

QUESTION = " What was the number I gave you at the start? Answer:"


def feed(engine: Engine, slot: int, ids: list[int], recall: bool, all_logits: bool = False) -> torch.Tensor:
    """One turn's prompt as the scheduler feeds it: chunks, the last one (recall) ending with the recall
    round. -> logits [T, V] or [V] of the last."""
    t = torch.as_tensor(ids, dtype=torch.long)
    outs = []
    for off, size in engine.chunks(engine.slab.seen[slot], len(ids)):
        last = recall and off + size == len(ids)
        outs.append(engine.forward([slot], t[None, off : off + size], last_only=not all_logits, recall=last)[0])
    return torch.cat(outs) if all_logits else outs[-1][-1]


def history_bytes(engine: Engine) -> list[dict]:
    """Bytes per history token by storage dtype, and the error of the lossy ones on a real history."""
    a = engine.args
    per = a.num_layers * a.num_kv_heads * a.head_dim * 2  # K and V elements per token
    slot = engine.alloc()
    ids = token_windows(engine.tokenizer, read_part(corpus_paths()["brown"], "test"), 512, 1)[0]
    feed(engine, slot, ids, recall=False)
    h = engine.histories.get(slot)
    kv = torch.cat(h.tensors()).float()  # [2L, Hkv, T, D]
    measured = h.nbytes() / h.held
    engine.free(slot)

    def rel(x: torch.Tensor) -> float:
        return float((x - kv).norm() / kv.norm())

    q, s = ops.quantize_int8(kv)
    rows = [{"measure": "bytes", "storage": "fp32", "bytes_per_token": per * 4, "rel_error": 0.0},
            {"measure": "bytes", "storage": "bf16", "bytes_per_token": per * 2,
             "rel_error": rel(kv.bfloat16().float())},
            {"measure": "bytes", "storage": "int8", "bytes_per_token": per + 2 * a.num_layers * a.num_kv_heads * 4,
             "rel_error": rel(ops.dequantize_int8(q, s))}]
    for r in rows:
        r["bytes_per_token_measured"] = round(measured) if r["storage"] == str(engine.dtype).removeprefix("torch.") \
            .replace("float32", "fp32") else None
    return rows


def _timed_turn(engine: Engine, base: int, work: int, ids: list[int], recall: bool) -> float:
    engine.slab.copy(base, work)  # the same state every repeat (the history is copied too)
    t0 = time.perf_counter()
    logits = feed(engine, work, ids, recall)
    int(logits.argmax())  # the first token
    return time.perf_counter() - t0


def ttft_rows(with_recall: Engine, without: Engine, history: list[int], lengths: list[int],
              turns: list[list[int]], repeats: int) -> list[dict]:
    """TTFT of each turn (token ids, ending with the question) after each history length, with and
    without the recall round; the two engines' repeats alternate, so both see the same machine load.
    `x_without` is the ratio to the same turn without the round, `score_ms` the round's page scoring
    (reading every history key) within it."""
    engines = ((without, False), (with_recall, True))
    slots = [(eng.alloc(), eng.alloc()) for eng, _ in engines]  # (base, work) per engine
    scoring: list[float] = []  # seconds of each round's page scoring (`Engine._choose_pages`)
    choose, once = with_recall._choose_pages, Timer(with_recall.device, warmup=0, iters=1)

    def timed_choose(*args, **kw):
        out = []
        scoring.append(once.samples(lambda: out.append(choose(*args, **kw)))[0])
        return out[0]

    with_recall._choose_pages = timed_choose  # this engine only, until the rows are done
    rows, done = [], 0
    try:
        for L in lengths:
            for (eng, _), (base, _) in zip(engines, slots, strict=True):
                feed(eng, base, history[done:L], recall=False)
            done = L
            for turn in turns:
                times: list[list[float]] = [[], []]
                scoring.clear()
                for _ in range(repeats):
                    for i, ((eng, recall), (base, work)) in enumerate(zip(engines, slots, strict=True)):
                        times[i].append(_timed_turn(eng, base, work, turn, recall))
                for (eng, _), t in zip(engines, times, strict=True):
                    rows.append({"measure": "ttft", "policy": eng.policy.name, "history": L,
                                 "turn_tokens": len(turn), "ttft_ms": round(1e3 * statistics.median(t), 2),
                                 "ttft_ms_min": round(1e3 * min(t), 2), "repeats": repeats})
                rows[-1]["x_without"] = round(rows[-1]["ttft_ms"] / rows[-2]["ttft_ms"], 3)
                rows[-1]["score_ms"] = round(1e3 * statistics.median(scoring), 2) if scoring else None
                progress(f"  ttft history {L:5d} turn {len(turn):4d}: {rows[-2]['ttft_ms']:.1f} ms without, "
                         f"{rows[-1]['ttft_ms']:.1f} ms with the round ({rows[-1]['x_without']:.2f}x; "
                         f"scoring {rows[-1]['score_ms']} ms)")
    finally:
        del with_recall._choose_pages  # the class's method again
        for (eng, _), (base, work) in zip(engines, slots, strict=True):
            eng.free(base)
            eng.free(work)
    return rows


@torch.inference_mode()
def turn_nll(engine: Engine, ids: list[int], turn: int, recall: bool) -> tuple[float, int]:
    """Next-token NLL of a window read as turns of `turn` tokens (recall round at each turn's end)."""
    slot = engine.alloc()
    try:
        outs = []
        for i in range(0, len(ids), turn):
            outs.append(feed(engine, slot, ids[i : i + turn], recall, all_logits=True))
            engine.end_turn([slot])  # as the scheduler does when a reply ends: lent pages go back
        logits = torch.cat(outs)  # [T, V]
        nll = F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="sum")
        return float(nll), len(ids) - 1
    finally:
        engine.free(slot)


def ppl_rows(factory: EngineFactory, bases: list[str], budget: int, context: int, windows: int,
             turn: int, part: str = "test") -> list[dict]:
    rows = []
    for name, path in corpus_paths().items():
        wins = token_windows(factory.tokenizer, read_part(path, part), context, windows)
        for base in bases:
            for policy in (base, base + "+recall"):
                eng = factory.make(policy, budget)
                parts = [turn_nll(eng, w, turn, recall="recall" in policy) for w in wins]
                nll, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
                rows.append({"measure": "ppl", "policy": policy, "text": name, "ppl": round(math.exp(nll / n), 4),
                             "tokens": n, "turn": turn, "part": part})
                progress(f"  ppl {name:16s} {policy:20s} {rows[-1]['ppl']:.3f}")
    return rows


def bench_recall(factory: EngineFactory, policy: str = "h2o", budget: int = 128,
                 lengths: tuple[int, ...] = (1024, 4096, 7680), repeats: int = 3, context: int = 2048,
                 windows: int = 1, turn: int = 256, ppl_bases: tuple[str, ...] = ("h2o", "lambda+less"),
                 part: str = "test", prefixes: tuple[int, ...] = (0,)) -> BenchResult:
    """`prefixes`: tokens of text before the question in each timed turn (0: the question alone; the
    text is the tinyshakespeare test part, which no history here holds)."""
    with_recall = factory.make(policy + "+recall", budget, max_slots=2)
    without = factory.make(policy, budget, max_slots=2)
    tok = factory.tokenizer
    progress("history bytes per token")
    rows = history_bytes(with_recall)
    text = read_part(corpus_paths()["brown"], "test") + read_part(corpus_paths()["python_docs"], "test")
    history = tok(text, add_special_tokens=False)["input_ids"]
    if len(history) < max(lengths):
        raise ValueError(f"the test parts hold {len(history)} tokens, fewer than history {max(lengths)}")
    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    before = tok(read_part(corpus_paths()["tinyshakespeare"], "test"), add_special_tokens=False)["input_ids"]
    turns = [before[:n] + question for n in sorted(prefixes)]
    if max(lengths) + len(turns[-1]) > with_recall.max_model_len:
        raise ValueError(f"a {max(lengths)}-token history and a {len(turns[-1])}-token turn exceed the model's limit "
                         f"of {with_recall.max_model_len} tokens: lower --lengths or --ttft-prefix")
    progress(f"TTFT of {'/'.join(str(len(t)) for t in turns)}-token turns after each history length")
    rows += ttft_rows(with_recall, without, history, sorted(lengths), turns, repeats)
    if ppl_bases:
        progress(f"perplexity on the {part} parts, {windows} window(s) of {context} in turns of {turn}")
        rows += ppl_rows(factory, list(ppl_bases), budget, context, windows, turn, part)
    meta = {"model": with_recall.model_id, "device": str(with_recall.device), "dtype": str(with_recall.dtype),
            "threads": torch.get_num_threads(), "budget": budget, "recall_pages": with_recall.cfg.recall_pages,
            "recall_page": with_recall.cfg.recall_page, "recall_queries": with_recall.cfg.recall_queries,
            "recall_reread": with_recall.cfg.recall_reread, "recall_heads": with_recall.cfg.recall_heads,
            "recall_layer": with_recall.cfg.recall_layer}
    cols = ["measure", "policy", "storage", "text", "history", "turn_tokens", "ttft_ms", "ttft_ms_min", "x_without",
            "score_ms", "ppl", "tokens", "turn", "part", "bytes_per_token", "bytes_per_token_measured", "rel_error",
            "repeats"]
    return BenchResult("recall", rows, meta=meta, columns=cols, figure=figure)


def figure(rows: list[dict], path) -> None:
    """TTFT against history length per policy and turn length; its ratio to the base policy (the
    issue's 1.5x line); perplexity per text and policy, when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttft = [r for r in rows if r["measure"] == "ttft"]
    ppl = [r for r in rows if r["measure"] == "ppl"]
    fig, axes = plt.subplots(1, 3 if ppl else 2, figsize=(16 if ppl else 11, 4))
    a, x = axes[0], axes[1]
    for pol, n in dict.fromkeys((r["policy"], r.get("turn_tokens")) for r in ttft):
        pts = [r for r in ttft if r["policy"] == pol and r.get("turn_tokens") == n]
        a.plot([r["history"] for r in pts], [r["ttft_ms"] for r in pts], marker="o", label=f"{pol}, {n}-token turn")
        if "x_without" in pts[0]:
            x.plot([r["history"] for r in pts], [r["x_without"] for r in pts], marker="o", label=f"{n}-token turn")
    a.set(xlabel="history (tokens)", ylabel="TTFT (ms)", title="a turn's time to first token", xscale="log")
    a.legend(fontsize=7)
    x.axhline(1.5, color="grey", linestyle="--", label="1.5x")
    x.set(xlabel="history (tokens)", ylabel="TTFT with / without the round", title="the round's TTFT ratio",
          xscale="log", ylim=(0, None))
    x.legend(fontsize=7)
    if ppl:
        b = axes[2]
        texts = list(dict.fromkeys(r["text"] for r in ppl))
        pols = list(dict.fromkeys(r["policy"] for r in ppl))
        w = 0.8 / len(pols)
        for i, pol in enumerate(pols):
            vals = [next((r["ppl"] for r in ppl if r["text"] == t and r["policy"] == pol), float("nan")) for t in texts]
            b.bar([j + i * w for j in range(len(texts))], vals, w, label=pol)
        b.set_xticks([j + 0.4 - w / 2 for j in range(len(texts))], texts)
        b.set(ylabel="perplexity", title="test parts, read as turns")
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
