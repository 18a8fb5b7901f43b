"""End-to-end fine-tuning of every layer's LESS weights through the compressed model.

Per-layer training (train_layer) fits each layer's attention output given the *full* model's
inputs. At inference each layer sees inputs already perturbed by the compression upstream, and
what matters is the next-token distribution. This stage starts from per-layer kernels and
minimises KL(full || compressed+LESS) of the next-token distributions (positions past the
budget), running the whole frozen model in the parallel form of the engine's chunked prefill:

  query chunk c attends sparsely to the keys still cached after chunk c-1 plus its own chunk
  (causal), and through H, z to the keys evicted by then (train_layer.less_output).

The eviction is replayed per layer from that same forward's q, k (train_capture.eviction_chunks,
the engine's reference ops), so masks are exactly the ones the engine would make, including the
upstream drift LESS itself causes. Attention is checkpointed per layer: memory holds one layer's
score matrix, not thirty.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lessserve.kernels.reference.evict import EvictionSpec
from lessserve.kernels.reference.lowrank import LessLayerWeights
from lessserve.lab.output import progress_bar
from lessserve.training.capture import eviction_chunks
from lessserve.training.config import FinetuneConfig
from lessserve.training.layer import LayerBatch, less_output
from lessserve.workers.less_weights import FIELDS, LessWeights
from lessserve.workers.model import LlamaModel, causal_attend


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, e: torch.Tensor,
                     chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse (kept-keys) causal attention of the parallel chunked prefill.
    q [n, Hq, T, D], k/v [n, Hkv, T, D], e [n, Hkv, T] -> o_s [n, Hq, T, D], lse [n, Hq, T] (fp32).

    Query chunk c sees the cache left after chunk c-1 (keys i < c*chunk with e_i >= c, at most the
    budget) plus its own chunk causally, so each chunk gathers W + chunk keys instead of scoring T:
    the cost is the engine's, not T^2."""
    n, Hq, T, D = q.shape
    Hkv, G, nC = k.shape[1], Hq // k.shape[1], T // chunk
    dev = q.device
    t, c = torch.arange(T, device=dev), torch.arange(nC, device=dev)
    cached = (e[:, :, None, :] >= c[:, None]) & (t < (c * chunk)[:, None])  # [n, Hkv, nC, T]
    W = max(int(cached.sum(-1).max()), 1)
    idx = cached.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[..., :W]  # [n, Hkv, nC, W]
    valid = cached.gather(-1, idx)  # [n, Hkv, nC, W]
    own = (c[:, None] * chunk + torch.arange(chunk, device=dev)).expand(n, Hkv, nC, chunk)
    idx = torch.cat([idx, own], -1).flatten(2)[..., None].expand(-1, -1, -1, D)  # [n, Hkv, nC*(W+C), D]
    kk = k.float().gather(2, idx).view(n, Hkv, nC, W + chunk, D)
    vv = v.float().gather(2, idx).view(n, Hkv, nC, W + chunk, D)
    s = torch.einsum("nhgcqd,nhckd->nhgcqk", q.float().view(n, Hkv, G, nC, chunk, D), kk) * D**-0.5
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=dev).tril()
    mask = torch.cat([valid[:, :, None, :, None, :].expand(n, Hkv, 1, nC, chunk, W),
                      causal.expand(n, Hkv, 1, nC, chunk, chunk)], -1)  # [n, Hkv, 1, nC, C, W+C]
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)  # [n, Hkv, G, nC, C]
    o = torch.einsum("nhgcqk,nhckd->nhgcqd", torch.exp(s - lse[..., None]), vv)
    return o.reshape(n, Hq, T, D), lse.reshape(n, Hq, T)


def parallel_less_attention(q, k, v, e, chunk: int, w: LessLayerWeights | None, dropout: float = 0.0):
    """The engine's chunked-prefill output for one layer, in one parallel pass (T a multiple of chunk).
    -> [n, Hq, T, D] in q's dtype."""
    o_s, lse = sparse_attention(q, k, v, e, chunk)
    T = q.shape[2]
    b = LayerBatch(k=k.float(), v=v.float(), e=e, q=q.float(), o_sparse=o_s, lse=lse, o_full=o_s,
                   q_chunk=torch.arange(T, device=q.device) // chunk)
    return less_output(b, w, dropout).to(q.dtype)


def compressed_logits(model: LlamaModel, tokens: torch.Tensor, spec: EvictionSpec, chunk: int,
                      layers: list[LessLayerWeights] | None, dropout: float = 0.0,
                      grad_checkpoint: bool = True) -> torch.Tensor:
    """tokens [n, T] -> logits [n, T, V] of the engine's chunked prefill under `spec` (+LESS when
    layers is given). Differentiable in the LESS weights."""
    n, T = tokens.shape
    if T % chunk:
        raise ValueError(f"sequence length {T} must be a multiple of the chunk {chunk}")

    def attend(i, q, k, v):
        e = eviction_chunks(q.detach(), k.detach(), v.detach(), spec, chunk)  # [n, Hkv, T]
        w = layers[i] if layers is not None else None
        if grad_checkpoint and torch.is_grad_enabled():
            flat = [getattr(w, f) for f in FIELDS] if w is not None else []

            def fn(q, k, v, *ws):
                lw = LessLayerWeights(**dict(zip(FIELDS, ws, strict=True))) if ws else None
                return parallel_less_attention(q, k, v, e, chunk, lw, dropout)

            return checkpoint(fn, q, k, v, *flat, use_reentrant=False)
        return parallel_less_attention(q, k, v, e, chunk, w, dropout)

    pos = torch.arange(T, device=tokens.device)[None].expand(n, T)
    return model(tokens, pos, attend)


def kl_to_full(logits: torch.Tensor, full_logp: torch.Tensor, start: int) -> torch.Tensor:
    """Mean over positions >= start of KL(full || compressed). logits/full_logp: [n, T, V]."""
    logp = F.log_softmax(logits[:, start:].float(), -1)
    p = full_logp[:, start:].exp()
    return (p * (full_logp[:, start:] - logp)).sum(-1).mean()


def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor, start: int) -> tuple[float, int]:
    """Sum of next-token NLL for predictions of tokens start+1.. and their count."""
    lp = F.log_softmax(logits[:, start:-1].float(), -1)
    tgt = tokens[:, start + 1:]
    return float(-lp.gather(-1, tgt[..., None]).sum()), int(tgt.numel())


@torch.no_grad()
def sparse_only_nll(model, seqs: torch.Tensor, spec, chunk, start: int) -> float:
    """Summed next-token NLL past `start` without LESS: fixed for a run (the model is frozen)."""
    return sum(next_token_nll(compressed_logits(model, s[None], spec, chunk, None), s[None], start)[0] for s in seqs)


@torch.no_grad()
def val_metrics(model, seqs: torch.Tensor, spec, chunk, layers, start: int, sparse_nll: float) -> dict:
    """On positions past `start`: KL(full || sparse+LESS) (the training objective, used to pick the
    best step), and the perplexity of full, sparse-only and sparse+LESS with the gap closed.
    sparse_nll: sparse_only_nll of these sequences (computed once per run)."""
    tot = {"full": 0.0, "sparse": sparse_nll, "less": 0.0}
    kl, cnt = 0.0, 0
    for s in seqs:
        tok = s[None]
        pos = torch.arange(tok.shape[1])[None]
        full = model(tok, pos, causal_attend)
        less = compressed_logits(model, tok, spec, chunk, layers)
        kl += float(kl_to_full(less, F.log_softmax(full.float(), -1), start)) / len(seqs)
        nll_f, c = next_token_nll(full, tok, start)
        tot["full"] += nll_f
        tot["less"] += next_token_nll(less, tok, start)[0]
        cnt += c
    out = {"kl": kl, **{k: math.exp(v / cnt) for k, v in tot.items()}}
    gap = out["sparse"] - out["full"]
    out["gap_closed"] = (out["sparse"] - out["less"]) / gap if gap > 0 else float("nan")
    return out


def finetune(model: LlamaModel, kernels: LessWeights, train: torch.Tensor, val: torch.Tensor, spec: EvictionSpec,
             chunk: int, cfg: FinetuneConfig, state_path: Path | None = None, log=None,
             stop_after: int | None = None) -> tuple[LessWeights, dict]:
    """train/val [N, T] token ids. Adam with cosine decay; keeps the weights with the lowest validation
    KL (step 0 = the starting kernels). Resumable from `state_path` (saved after each eval);
    stop_after ends the run early at that step, as an interruption would."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    for p in model.parameters():
        p.requires_grad_(False)
    layers = [LessLayerWeights(**{f: getattr(w, f).detach().float().clone().requires_grad_(True) for f in FIELDS})
              for w in kernels.layers]
    params = [getattr(w, f) for w in layers for f in FIELDS]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    start = (spec.budget // chunk) * chunk
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randint(len(train), (cfg.steps,), generator=gen).tolist()
    step, history = 0, []
    best_params = [p.detach().clone() for p in params]
    if state_path and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        for p, s in zip(params, st["params"], strict=True):
            p.data.copy_(s)
        best_params = st["best"]
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        step, history = st["step"], st["history"]
        log(f"resumed fine-tuning at step {step}/{cfg.steps}")
    sparse_nll = sparse_only_nll(model, val, spec, chunk, start)
    if not history:
        history.append({"step": 0, **val_metrics(model, val, spec, chunk, layers, start, sparse_nll)})
        log(f"step 0: val {history[-1]}")

    def save():
        if state_path:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"params": [p.detach() for p in params], "best": best_params, "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step, "history": history}, tmp)
            tmp.rename(state_path)

    t0 = time.time()
    with progress_bar(total=cfg.steps, initial=step, desc="LESS end-to-end", unit="step") as bar:
        while step < cfg.steps:
            tok = train[order[step]][None]
            with torch.no_grad():
                pos = torch.arange(tok.shape[1])[None]
                full_logp = F.log_softmax(model(tok, pos, causal_attend).float(), -1)
            loss = kl_to_full(compressed_logits(model, tok, spec, chunk, layers, cfg.dropout), full_logp, start)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            step += 1
            bar.set_postfix(kl=f"{float(loss.detach()):.4f}")
            bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                r = {"step": step, "train_kl": float(loss.detach()),
                     **val_metrics(model, val, spec, chunk, layers, start, sparse_nll)}
                if r["kl"] < min(h["kl"] for h in history):
                    best_params = [p.detach().clone() for p in params]
                history.append(r)
                log(f"step {step}: val {r}")
                save()
                if stop_after is not None and step >= stop_after:
                    break
    best = min(history, key=lambda h: h["kl"])
    out = [LessLayerWeights(**{f: best_params[i * len(FIELDS) + j] for j, f in enumerate(FIELDS)})
           for i in range(len(layers))]
    summary = {"steps": cfg.steps, "lr": cfg.lr, "dropout": cfg.dropout, "clip": cfg.clip, "best_step": best["step"],
               "val_before": history[0], "val_best": best, "history": history,
               "seconds": round(time.time() - t0, 1)}
    return LessWeights(out, dict(kernels.manifest)), summary


def run_finetune(model: LlamaModel, kernels: LessWeights, seqs: torch.Tensor, spec: EvictionSpec, chunk: int,
                 cfg: FinetuneConfig, work_dir: Path, command: str, resume: bool = True,
                 device: torch.device | str = "cpu", max_val: int = 3) -> LessWeights:
    """seqs [N, T]: a seeded 90/10 split into training and validation sequences (at most max_val of
    them validate: each pass costs three forwards per sequence); the run's state is
    kept in work_dir (keyed by the starting kernels, data and settings) so an interrupted run resumes."""
    import hashlib

    from lessserve.training.data import split_train_val

    device = torch.device(device)
    model = model.to(device).eval()
    tr, va = split_train_val(len(seqs), cfg.seed)
    va = va[:max_val]
    key = hashlib.sha256(f"{kernels.digest()}|{cfg}|{spec}|{chunk}".encode() + seqs.numpy().tobytes()).hexdigest()[:12]
    work_dir.mkdir(parents=True, exist_ok=True)
    state = work_dir / f"finetune-{key}.pt"
    if state.exists() and not resume:
        state.unlink()
    out, summary = finetune(model, kernels.to(device), seqs[tr].to(device), seqs[va].to(device), spec, chunk, cfg,
                            state_path=state)
    out.manifest["finetune"] = {"command": command, "objective": "KL(full || compressed+LESS), positions >= budget",
                                "seq_len": int(seqs.shape[1]), "train_seqs": len(tr), "val_seqs": len(va), **summary}
    return out.to("cpu")
