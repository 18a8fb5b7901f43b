"""Train one layer's LESS weights (phi, psi) against the full attention output after o_proj.

For a query t in chunk c = t // chunk, with e the eviction chunk of every key (train_capture):
  sparse set   {i <= t : e_i >= c}        -> o_s (sparse softmax output), lse (its log-sum-exp)
  low-rank set {i : e_i < c}              -> H_c = sum psi(k_i)^T v_i, z_c = sum psi(k_i)
  LESS output  o = (o_s + e^-lse phi(q) H_c) / (1 + e^-lse phi(q) z_c)
which is the inference formula (attention.py) divided through by the sparse denominator.
Loss: MSE between o_proj(o) and o_proj(full attention) on queries at positions >= budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lessserve.kernels.reference.lowrank import LessLayerWeights, phi_ref, psi_ref


@dataclass
class LayerBatch:
    """Everything one layer's training needs for a set of sequences (P = T - start query positions)."""

    k: torch.Tensor  # [N, Hkv, T, D]
    v: torch.Tensor  # [N, Hkv, T, D]
    e: torch.Tensor  # [N, Hkv, T] int32 eviction chunk
    q: torch.Tensor  # [N, Hq, P, D]
    o_sparse: torch.Tensor  # [N, Hq, P, D]
    lse: torch.Tensor  # [N, Hq, P]
    o_full: torch.Tensor  # [N, Hq, P, D]
    q_chunk: torch.Tensor  # [P] long, chunk index of each query position

    def select(self, idx: list[int] | torch.Tensor) -> LayerBatch:
        return LayerBatch(**{f: (getattr(self, f) if f == "q_chunk" else getattr(self, f)[idx])
                             for f in self.__dataclass_fields__})

    def select_chunks(self, chunks: torch.Tensor) -> LayerBatch:
        """Only the queries of the given chunk ids (keys stay whole)."""
        m = torch.isin(self.q_chunk, chunks)
        return LayerBatch(k=self.k, v=self.v, e=self.e, q=self.q[:, :, m], o_sparse=self.o_sparse[:, :, m],
                          lse=self.lse[:, :, m], o_full=self.o_full[:, :, m], q_chunk=self.q_chunk[m])


@torch.no_grad()
def prepare_layer(q, k, v, e, chunk: int, start: int, batch: int = 4,
                  chunks: torch.Tensor | None = None) -> LayerBatch:
    """q [N, Hq, T, D], k/v [N, Hkv, T, D], e [N, Hkv, T] -> LayerBatch for queries t >= start
    (start a multiple of chunk), or only those in the given query chunk ids."""
    N, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    t = torch.arange(T, device=q.device)
    keep = t >= start if chunks is None else torch.isin(t // chunk, chunks.to(q.device)) & (t >= start)
    tq = t[keep]  # [P] query positions
    qc = tq // chunk  # [P]
    causal = t[None, :] <= tq[:, None]  # [P, T]
    o_s, lse, o_f = [], [], []
    for s in range(0, N, batch):
        qs = q[s : s + batch][:, :, keep].float().view(-1, Hkv, G, len(tq), D)
        ks, vs, es = k[s : s + batch].float(), v[s : s + batch].float(), e[s : s + batch]
        sc = torch.einsum("nhgpd,nhtd->nhgpt", qs, ks) * D**-0.5  # [n, Hkv, G, P, T]
        full = sc.masked_fill(~causal, float("-inf"))
        kept = causal & (es[:, :, None, None, :] >= qc[None, None, None, :, None])
        sparse = sc.masked_fill(~kept, float("-inf"))
        lse.append(torch.logsumexp(sparse, -1).flatten(1, 2))
        o_s.append(torch.einsum("nhgpt,nhtd->nhgpd", sparse.softmax(-1), vs).flatten(1, 2))
        o_f.append(torch.einsum("nhgpt,nhtd->nhgpd", full.softmax(-1), vs).flatten(1, 2))
    return LayerBatch(k=k.float(), v=v.float(), e=e, q=q[:, :, keep].float(), o_sparse=torch.cat(o_s),
                      lse=torch.cat(lse), o_full=torch.cat(o_f), q_chunk=qc)


def less_output(b: LayerBatch, w: LessLayerWeights | None, dropout: float = 0.0) -> torch.Tensor:
    """-> o [N, Hq, P, D]; w=None gives the sparse-only output. Queries are grouped by chunk
    (P must be whole chunks: start is a multiple of the chunk size)."""
    if w is None:
        return b.o_sparse
    N, Hkv, T, D = b.k.shape
    Hq, P = b.q.shape[1], b.q.shape[2]
    G = Hq // Hkv
    chunks = torch.unique_consecutive(b.q_chunk)  # [Cq] chunk ids of the query positions
    psi = psi_ref(b.k, w, dropout)  # [N, Hkv, T, R]
    # State after each eviction chunk: sum over keys evicted at chunk <= c, then read at c - 1.
    n_e = int(b.e.max()) + 1
    idx = b.e.long()[..., None]  # [N, Hkv, T, 1]
    kv = (psi[..., :, None] * b.v[..., None, :]).flatten(-2)  # [N, Hkv, T, R*D]
    Hc = torch.zeros(N, Hkv, n_e, kv.shape[-1], dtype=kv.dtype, device=kv.device)
    Hc = Hc.scatter_add(2, idx.expand_as(kv), kv).cumsum(2)  # [N, Hkv, n_e, R*D]
    zc = torch.zeros(N, Hkv, n_e, psi.shape[-1], dtype=psi.dtype, device=psi.device)
    zc = zc.scatter_add(2, idx.expand_as(psi), psi).cumsum(2)  # [N, Hkv, n_e, R]
    prev = (chunks - 1).clamp_min(0)
    live = (chunks > 0).to(psi.dtype)[None, None, :, None]  # chunk 0 sees no evictions
    Hs = (Hc[:, :, prev] * live).unflatten(-1, (-1, D))  # [N, Hkv, Cq, R, D]
    zs = zc[:, :, prev] * live  # [N, Hkv, Cq, R]
    phi = phi_ref(b.q, w, dropout).view(N, Hkv, G, len(chunks), P // len(chunks), -1)  # [N,Hkv,G,Cq,S,R]
    num = torch.einsum("nhgcsr,nhcrd->nhgcsd", phi, Hs).reshape(N, Hq, P, D)
    den = torch.einsum("nhgcsr,nhcr->nhgcs", phi, zs).reshape(N, Hq, P, 1)
    wt = torch.exp(-b.lse)[..., None]
    return (b.o_sparse + wt * num) / (1 + wt * den)


def projected_mse(o: torch.Tensor, o_full: torch.Tensor, o_proj: torch.Tensor) -> torch.Tensor:
    """MSE after the frozen o_proj [hidden, Hq*D]; o, o_full: [N, Hq, P, D]."""
    d = (o - o_full).transpose(1, 2).flatten(2)  # [N, P, Hq*D]
    return F.linear(d, o_proj).pow(2).mean()


def init_weights(Hq: int, Hkv: int, D: int, rank: int, hidden: int, gen: torch.Generator) -> LessLayerWeights:
    r = lambda *s, fan: torch.randn(*s, generator=gen) / math.sqrt(fan)  # noqa: E731
    return LessLayerWeights(
        w1q=r(Hq, D, hidden, fan=D), w2q=r(Hq, hidden, rank, fan=hidden),
        w1k=r(Hkv, D, hidden, fan=D), w2k=r(Hkv, hidden, rank, fan=hidden), wint=r(Hkv, rank, rank, fan=rank),
        s1=torch.full((Hkv, rank), 1e-4), s2=torch.full((Hkv, rank), 1e-4),
    )


@dataclass
class LayerResult:
    weights: LessLayerWeights
    val_loss: float
    sparse_val_loss: float
    train_loss: float
    best_epoch: int


def _snapshot(w: LessLayerWeights) -> LessLayerWeights:
    return LessLayerWeights(**{k: p.detach().clone() for k, p in vars(w).items()})


@torch.no_grad()
def evaluate(b: LayerBatch, w: LessLayerWeights | None, o_proj: torch.Tensor, batch: int) -> float:
    n = b.q.shape[0]
    tot = 0.0
    for s in range(0, n, batch):
        sb = b.select(list(range(s, min(n, s + batch))))
        tot += float(projected_mse(less_output(sb, w), sb.o_full, o_proj)) * sb.q.shape[0]
    return tot / n


def train_layer(train: LayerBatch, val: LayerBatch, o_proj: torch.Tensor, rank: int, hidden: int, epochs: int,
                seed: int, lr: float = 1e-3, batch: int = 2, dropout: float = 0.3, step_every: int | None = None,
                query_chunks: int | None = None, on_step=None) -> LayerResult:
    """Adam + StepLR; keeps the weights with the best validation loss (epoch 0 = before training).
    query_chunks: train each step on that many randomly chosen query chunks (None = all)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    N, Hq, _, D = train.q.shape
    w = init_weights(Hq, train.k.shape[1], D, rank, hidden, gen).to(train.q.device)
    params = list(vars(w).values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_every or max(1, epochs // 4), gamma=0.5)
    sparse = evaluate(val, None, o_proj, batch * 2)
    best = LayerResult(_snapshot(w), evaluate(val, w, o_proj, batch * 2), sparse, float("nan"), 0)
    for ep in range(1, epochs + 1):
        order = torch.randperm(N, generator=gen).tolist()
        tot = 0.0
        for s in range(0, N, batch):
            sb = train.select(order[s : s + batch])
            all_chunks = torch.unique_consecutive(train.q_chunk)
            if query_chunks and query_chunks < len(all_chunks):
                pick = torch.randperm(len(all_chunks), generator=gen)[:query_chunks]
                sb = sb.select_chunks(all_chunks[pick])
            loss = projected_mse(less_output(sb, w, dropout), sb.o_full, o_proj)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * sb.q.shape[0]
            if on_step:
                on_step()
        sched.step()
        val_loss = evaluate(val, w, o_proj, batch * 2)
        if val_loss < best.val_loss:
            best = LayerResult(_snapshot(w), val_loss, sparse, tot / N, ep)
    return best
