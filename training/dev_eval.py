"""Dev-set probe of LESS weights: gap closed per text on the dev parts (lab/corpus.py), through the
parallel form of the engine's chunked prefill (training/e2e.py, equal to Engine.prefill to 1e-4).
This is what variants are chosen by; reports use the test parts (`lessserve eval report`).

    python -m lessserve.training.dev_eval --weights FILE [FILE ...] --policy h2o --budget 128 \\
        [--seq-len 2048 --per-text 2 --threads 1 --json out.json]

A learning curve (dev gap closed per text against the tokens each file's training saw, from its
manifest) of the rows of earlier runs:

    python -m lessserve.training.dev_eval --curve ROWS.json [ROWS.json ...] --json curve.json --plot curve.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lessserve.lab.corpus import corpus_paths
from lessserve.training.data import dev_blocks, read_corpus
from lessserve.training.e2e import gap_metrics, less_nll, reference_nll
from lessserve.workers.compression import Policy, eviction_spec, less_state_tokens
from lessserve.workers.less_weights import LessWeights
from lessserve.workers.model import LlamaModel
from lessserve.workers.model_loader import DEFAULT_MODEL, load_checkpoint, load_tokenizer


def dev_probe(weights: list[str], policy: str, budget: int, seq_len: int = 2048, per_text: int = 2,
              chunk: int = 32, data: list[str] | None = None, model_name: str = DEFAULT_MODEL) -> list[dict]:
    """One row per weights file: dev metrics (gap_metrics) with the `+` baseline of equal bytes."""
    ckpt = load_checkpoint(model_name)
    tok = load_tokenizer(ckpt.folder)
    dev = read_corpus(data or [str(p) for p in corpus_paths().values()], "dev", tok)
    seqs, names = dev_blocks(dev, seq_len, per_text)
    model = LlamaModel(ckpt.args)
    model.load_hf_state_dict(ckpt.state_dict)
    model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    spec = eviction_spec(Policy.parse(policy), budget, None, 4, max_context=1 << 30)
    start = (budget // chunk) * chunk
    refs: dict[int, dict] = {}
    rows = []
    for path in weights:
        t0 = time.time()
        w = LessWeights.load(path)
        if w.rank not in refs:
            plus = eviction_spec(Policy.parse(policy + "+"), budget, None, 4, max_context=1 << 30,
                                 extra_tokens=less_state_tokens(w.rank, ckpt.args.head_dim, 4))
            refs[w.rank] = reference_nll(model, seqs, spec, chunk, start, plus)
        ref = refs[w.rank]
        m = gap_metrics(ref, *less_nll(model, seqs, spec, chunk, w.layers, start, ref), names)
        rows.append({"weights": path, "tokens": tokens_seen(w.manifest), "policy": policy, "budget": budget,
                     "rank": w.rank,
                     "hidden": int(w.manifest["hidden"]), "trained_budget": int(w.manifest["budget"]),
                     "seq_len": seq_len, "dev_seqs": len(seqs), **m, "seconds": round(time.time() - t0, 1)})
        per = " ".join(f"{t} {v['gap_closed']:.1%} (+ {v['plus_gap_closed']:.1%})" for t, v in m["texts"].items())
        print(f"{path}: score {m['score']:.1%}  {per}  kl {m['kl']:.4f}", file=sys.stderr)
    return rows


def tokens_seen(manifest: dict) -> dict:
    """Training tokens per stage as the manifest records them ({"per_layer": N, "end_to_end": M, ...});
    an --init stage's own record is folded in: what the weights saw in all."""
    tok = dict(manifest.get("tokens") or {})
    init = tok.pop("init", None)
    if isinstance(init, dict):
        for k, v in init.items():
            tok[k] = tok.get(k, 0) + v
    elif init:
        tok["per_layer"] = tok.get("per_layer", 0) + int(init)
    return {k: int(v) for k, v in tok.items() if isinstance(v, int | float)}


def curve(rows: list[dict]) -> list[dict]:
    """One point per (policy, text and the mean score, weights): tokens seen in all -> gap closed."""
    out = []
    for r in rows:
        total = sum(r.get("tokens", {}).values())
        stages = "+".join(sorted(k for k, v in r.get("tokens", {}).items() if v)) or "unknown"
        for text, v in [*r["texts"].items(), ("score (mean)", {"gap_closed": r["score"]})]:
            out.append({"policy": r["policy"], "text": text, "tokens": total, "stages": stages,
                        "gap_closed": v["gap_closed"], "weights": Path(r["weights"]).name})
    return sorted(out, key=lambda p: (p["policy"], p["text"], p["tokens"]))


def curve_plot(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted({p["policy"] for p in points})
    fig, axes = plt.subplots(1, len(policies), figsize=(6 * len(policies), 4.2), squeeze=False)
    texts = sorted({p["text"] for p in points})
    colour = {t: f"C{i}" for i, t in enumerate(texts)}
    for ax, pol in zip(axes[0], policies, strict=True):
        for text in texts:
            for per_layer_only in (True, False):  # the per-layer stage's curve; weights with end-to-end steps
                pts = [p for p in points if p["policy"] == pol and p["text"] == text
                       and (p["stages"] == "per_layer") == per_layer_only]
                if pts:
                    ax.plot([p["tokens"] for p in pts], [100 * p["gap_closed"] for p in pts],
                            "-o" if per_layer_only else "s", color=colour[text], fillstyle="full" if per_layer_only
                            else "none", label=text + ("" if per_layer_only else " (with end-to-end)"))
        ax.set_xscale("log")
        ax.set_xlabel("training tokens seen")
        ax.set_ylabel("dev gap closed (%)")
        ax.set_title(f"{pol}+less, budget 128 (dev parts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lessserve.training.dev_eval", description=__doc__.split("\n")[0])
    p.add_argument("--weights", nargs="+")
    p.add_argument("--curve", nargs="+", default=None, help="rows JSON of earlier runs: write their learning curve")
    p.add_argument("--plot", default=None, help="with --curve: PNG of it")
    p.add_argument("--policy", choices=["h2o", "lambda"])
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--per-text", type=int, default=2)
    p.add_argument("--data", nargs="+", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.curve:
        rows = [r for f in a.curve for r in json.loads(Path(f).read_text())]
        for r in rows:  # rows of runs before tokens were recorded: read the manifest beside the weights
            if "tokens" not in r and Path(r["weights"]).with_suffix(".json").is_file():
                r["tokens"] = tokens_seen(json.loads(Path(r["weights"]).with_suffix(".json").read_text()))
        points = curve(rows)
        if a.json:
            Path(a.json).write_text(json.dumps(points, indent=2) + "\n")
        if a.plot:
            curve_plot(points, a.plot)
        return 0
    if not a.weights or not a.policy:
        p.error("--weights and --policy are required (or --curve)")
    torch.set_num_threads(a.threads)
    rows = dev_probe(a.weights, a.policy, a.budget, a.seq_len, a.per_text, data=a.data)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
