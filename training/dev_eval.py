"""Dev-set probe of LESS weights: gap closed per text on the dev parts (lab/corpus.py), through the
parallel form of the engine's chunked prefill (training/e2e.py, equal to Engine.prefill to 1e-4).
This is what variants are chosen by; reports use the test parts (`lessserve eval report`).

    python -m lessserve.training.dev_eval --weights FILE [FILE ...] --policy h2o --budget 128 \\
        [--seq-len 2048 --per-text 2 --threads 1 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

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
        rows.append({"weights": path, "policy": policy, "budget": budget, "rank": w.rank,
                     "hidden": int(w.manifest["hidden"]), "trained_budget": int(w.manifest["budget"]),
                     "seq_len": seq_len, "dev_seqs": len(seqs), **m, "seconds": round(time.time() - t0, 1)})
        per = " ".join(f"{t} {v['gap_closed']:.1%} (+ {v['plus_gap_closed']:.1%})" for t, v in m["texts"].items())
        print(f"{path}: score {m['score']:.1%}  {per}  kl {m['kl']:.4f}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lessserve.training.dev_eval", description=__doc__.split("\n")[0])
    p.add_argument("--weights", nargs="+", required=True)
    p.add_argument("--policy", choices=["h2o", "lambda"], required=True)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--per-text", type=int, default=2)
    p.add_argument("--data", nargs="+", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = dev_probe(a.weights, a.policy, a.budget, a.seq_len, a.per_text, data=a.data)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
