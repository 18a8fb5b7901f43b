"""End-to-end fine-tuning of every layer's LESS weights through the compressed model.

Per-layer training (train_layer) fits each layer's attention output given the *full* model's
inputs. At inference each layer sees inputs already perturbed by the compression upstream, and
what matters is the next-token distribution. This stage starts from per-layer LESS weights and
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
        dtype = q.dtype
        with torch.autocast(q.device.type, enabled=False):  # masks and attention in fp32 even under bf16 autocast
            q, k, v = q.float(), k.float(), v.float()
            e = eviction_chunks(q.detach(), k.detach(), v.detach(), spec, chunk)  # [n, Hkv, T]
            w = layers[i] if layers is not None else None
            if grad_checkpoint and torch.is_grad_enabled():
                flat = [getattr(w, f) for f in FIELDS] if w is not None else []

                def fn(q, k, v, *ws):
                    lw = LessLayerWeights(**dict(zip(FIELDS, ws, strict=True))) if ws else None
                    return parallel_less_attention(q, k, v, e, chunk, lw, dropout)

                return checkpoint(fn, q, k, v, *flat, use_reentrant=False).to(dtype)
            return parallel_less_attention(q, k, v, e, chunk, w, dropout).to(dtype)

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


KL_STRIDE = 8  # validation KL on every 8th position past the budget: the full log-probs stay in memory


@torch.no_grad()
def reference_nll(model: LlamaModel, seqs: torch.Tensor, spec: EvictionSpec, chunk: int, start: int,
                  plus_spec: EvictionSpec | None = None) -> dict[str, list]:
    """Per sequence, the summed next-token NLL past `start` of the full model, the sparse policy
    without LESS, and (plus_spec) the equal-memory `+` baseline; fixed for a run (frozen model).
    Also "count" (predicted tokens per sequence) and "logp" (the full model's log-probs at every
    KL_STRIDE-th position past start, for the validation KL)."""
    out: dict[str, list] = {"full": [], "sparse": [], "count": [], "logp": []}
    if plus_spec is not None:
        out["plus"] = []
    for s in seqs:
        tok = s[None]
        full = model(tok, torch.arange(tok.shape[1], device=tok.device)[None], causal_attend)
        nll, c = next_token_nll(full, tok, start)
        out["full"].append(nll)
        out["count"].append(c)
        out["logp"].append(F.log_softmax(full[0, start::KL_STRIDE].float(), -1))
        out["sparse"].append(next_token_nll(compressed_logits(model, tok, spec, chunk, None), tok, start)[0])
        if plus_spec is not None:
            out["plus"].append(next_token_nll(compressed_logits(model, tok, plus_spec, chunk, None), tok, start)[0])
    return out


@torch.no_grad()
def less_nll(model: LlamaModel, seqs: torch.Tensor, spec: EvictionSpec, chunk: int, layers, start: int,
             ref: dict) -> tuple[list[float], list[float]]:
    """Per sequence: summed NLL past start under sparse+LESS, and KL(full || sparse+LESS) (strided)."""
    nll, kl = [], []
    for s, logp in zip(seqs, ref["logp"], strict=True):
        logits = compressed_logits(model, s[None], spec, chunk, layers)
        nll.append(next_token_nll(logits, s[None], start)[0])
        lq = F.log_softmax(logits[0, start::KL_STRIDE].float(), -1)
        kl.append(float((logp.exp() * (logp - lq)).sum(-1).mean()))
    return nll, kl


def gap_metrics(ref: dict[str, list], less: list[float], kl: list[float], names: list[str] | None = None) -> dict:
    """Perplexities (full, sparse, plus, less), gap closed and KL, pooled over all sequences and per
    text (names[i] = text of sequence i). `score` = the mean over texts of the gap closed: what
    selection maximises, so a small text counts as much as a large one (where some text has no gap,
    as with a random model: minus the mean over texts of the KL to the full model)."""
    names = names or ["all"] * len(less)

    def pooled(idx: list[int]) -> dict:
        cnt = sum(ref["count"][i] for i in idx)
        ppl = {k: math.exp(sum(v[i] for i in idx) / cnt) for k, v in ref.items() if k not in ("count", "logp")}
        ppl["less"] = math.exp(sum(less[i] for i in idx) / cnt)
        ppl["kl"] = sum(kl[i] for i in idx) / len(idx)
        gap = ppl["sparse"] - ppl["full"]
        ppl["gap_closed"] = (ppl["sparse"] - ppl["less"]) / gap if gap > 0 else float("nan")
        if "plus" in ppl:
            ppl["plus_gap_closed"] = (ppl["sparse"] - ppl["plus"]) / gap if gap > 0 else float("nan")
        return ppl

    out = pooled(list(range(len(less))))
    texts = sorted(set(names), key=names.index)
    out["texts"] = {t: pooled([i for i, n in enumerate(names) if n == t]) for t in texts}
    per = out["texts"].values()
    ok = all(v["sparse"] > v["full"] for v in per)
    out["score"] = sum(v["gap_closed"] if ok else -v["kl"] for v in per) / len(texts)
    return out


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Learning-rate multiplier at `step`: linear warm-up, then the schedule's decay to 0 at cfg.steps."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    frac = min(step - cfg.warmup, cfg.steps - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.schedule == "linear":
        return 1 - frac
    return 1.0


def step_order(n: int, steps: int, seed: int) -> list[int]:
    """Training sequence of each step: passes over all n sequences, each pass a fresh permutation."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(n, generator=gen).tolist()
    return order[:steps]


def finetune(model: LlamaModel, less: LessWeights, train: torch.Tensor, val: torch.Tensor, spec: EvictionSpec,
             chunk: int, cfg: FinetuneConfig, state_path: Path | None = None, log=None,
             stop_after: int | None = None, val_names: list[str] | None = None,
             plus_spec: EvictionSpec | None = None) -> tuple[LessWeights, dict]:
    """train/val [N, T] token ids (val: the dev sequences, val_names their texts). Adam with the
    configured schedule; keeps the weights with the best validation score (mean over texts of the
    gap closed; step 0 = the starting weights); stops early after `patience` evaluations without a
    better score. Resumable from `state_path` (saved after each evaluation); stop_after ends the run
    early at that step, as an interruption would."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    for p in model.parameters():
        p.requires_grad_(False)
    layers = [LessLayerWeights(**{f: getattr(w, f).detach().float().clone().requires_grad_(True) for f in FIELDS})
              for w in less.layers]
    params = [getattr(w, f) for w in layers for f in FIELDS]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    start = (spec.budget // chunk) * chunk
    order = step_order(len(train), cfg.steps, cfg.seed)
    step, history, stale = 0, [], 0
    best_params = [p.detach().clone() for p in params]
    if state_path and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        for p, s in zip(params, st["params"], strict=True):
            p.data.copy_(s)
        best_params = st["best"]
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        step, history, stale = st["step"], st["history"], st.get("stale", 0)
        log(f"resumed fine-tuning at step {step}/{cfg.steps}")
    ref = reference_nll(model, val, spec, chunk, start, plus_spec)

    def evaluate(**extra) -> dict:
        return {"step": step, **extra, **gap_metrics(ref, *less_nll(model, val, spec, chunk, layers, start, ref),
                                                     val_names)}

    def save():
        if state_path:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"params": [p.detach() for p in params], "best": best_params, "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step, "history": history, "stale": stale}, tmp)
            tmp.rename(state_path)

    if not history:
        history.append(evaluate())
        log(f"step 0: dev {_brief(history[-1])}")
        save()
    t0, T = time.time(), train.shape[1]
    amp = torch.autocast(train.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    with progress_bar(total=cfg.steps, initial=step, desc="LESS end-to-end", unit="step") as bar:
        while step < cfg.steps and not (cfg.patience and stale >= cfg.patience):
            tok = train[order[step]][None]
            with torch.no_grad():
                pos = torch.arange(T, device=tok.device)[None]
                full_logp = F.log_softmax(model(tok, pos, causal_attend).float(), -1)
            with amp:
                logits = compressed_logits(model, tok, spec, chunk, layers, cfg.dropout)
            loss = kl_to_full(logits, full_logp, start)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            step += 1
            bar.set_postfix(kl=f"{float(loss.detach()):.4f}", best=f"{max(h['score'] for h in history):.3f}")
            bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                r = evaluate(train_kl=float(loss.detach()), lr=opt.param_groups[0]["lr"])
                if r["score"] > max(h["score"] for h in history):
                    best_params, stale = [p.detach().clone() for p in params], 0
                else:
                    stale += 1
                history.append(r)
                log(f"step {step}: dev {_brief(r)}")
                save()
                if stop_after is not None and step >= stop_after:
                    break
    best = max(history, key=lambda h: h["score"])
    out = [LessLayerWeights(**{f: best_params[i * len(FIELDS) + j] for j, f in enumerate(FIELDS)})
           for i in range(len(layers))]
    summary = {**cfg.model_dump(), "steps_run": step, "tokens": step * T, "best_step": best["step"],
               "val_before": history[0], "val_best": best, "history": history,
               "seconds": round(time.time() - t0, 1)}
    return LessWeights(out, dict(less.manifest)), summary


def _brief(r: dict) -> str:
    per = " ".join(f"{t} {v['gap_closed']:.1%}" for t, v in r.get("texts", {}).items())
    return f"score {r['score']:.3f} (pooled {r['gap_closed']:.1%}; {per}) less ppl {r['less']:.3f} kl {r['kl']:.4f}"


def run_finetune(model: LlamaModel, less: LessWeights, train: torch.Tensor, val: torch.Tensor,
                 val_names: list[str], spec: EvictionSpec, chunk: int, cfg: FinetuneConfig, work_dir: Path,
                 command: str, resume: bool = True, device: torch.device | str = "cpu",
                 plus_spec: EvictionSpec | None = None) -> LessWeights:
    """train [N, T] training sequences, val [M, T] dev sequences (val_names: their texts). The run's
    state is kept in work_dir (keyed by the starting LESS weights, data and settings) so an interrupted
    run resumes."""
    import hashlib

    device = torch.device(device)
    model = model.to(device).eval()
    key = hashlib.sha256(f"{less.digest()}|{cfg}|{spec}|{chunk}".encode() + train.numpy().tobytes()
                         + val.numpy().tobytes()).hexdigest()[:12]
    work_dir.mkdir(parents=True, exist_ok=True)
    state = work_dir / f"finetune-{key}.pt"
    if state.exists() and not resume:
        state.unlink()
    out, summary = finetune(model, less.to(device), train.to(device), val.to(device), spec, chunk, cfg,
                            state_path=state, val_names=val_names, plus_spec=plus_spec)
    out.manifest["finetune"] = {"command": command, "objective": "KL(full || compressed+LESS), positions >= budget",
                                "selection": "dev score: mean over texts of the gap closed (perplexity)",
                                "seq_len": int(train.shape[1]), "train_seqs": len(train), "val_seqs": len(val),
                                "val_texts": sorted(set(val_names)), **summary}
    return out.to("cpu")
