"""What LESS training learns from: per-layer Q, K, V of the frozen model, and the exact
eviction the inference engine would make on them.

Q/K/V come from a full-cache forward (the paper's recipe): the LESS weights are trained to
reproduce the uncompressed attention, and one capture serves every policy and budget.
`eviction_chunks` replays the engine's chunked prefill with the reference ops it runs
(chunk attention -> sparse-normalised masses -> evict-and-absorb), so the sparse/low-rank split
a query sees in training is the one it sees at inference, token for token.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lessserve.kernels.reference.attention import chunk_attention_ref
from lessserve.kernels.reference.evict import EvictionSpec, evict_absorb_ref
from lessserve.workers.model import LlamaModel


@torch.inference_mode()
def capture_qkv(model: LlamaModel, seqs: torch.Tensor, batch: int = 4, progress=None) -> list[dict]:
    """seqs [N, T] -> per layer {"q": [N, Hq, T, D], "k": [N, Hkv, T, D], "v": [N, Hkv, T, D]} (fp32, cpu)."""
    a = model.args
    N, T = seqs.shape
    dev = next(model.parameters()).device
    out = [{n: torch.empty(N, h, T, a.head_dim) for n, h in (("q", a.num_heads), ("k", a.num_kv_heads),
                                                              ("v", a.num_kv_heads))} for _ in range(a.num_layers)]
    for s in range(0, N, batch):
        e = min(N, s + batch)

        def attend(layer, q, k, v, s=s, e=e):
            out[layer]["q"][s:e], out[layer]["k"][s:e], out[layer]["v"][s:e] = q.float(), k.float(), v.float()
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        tok = seqs[s:e].to(dev)
        pos = torch.arange(T, device=dev)[None].expand(e - s, T)
        model(tok, pos, attend, last_only=True)
        if progress:
            progress(e - s)
    return out


@torch.inference_mode()
def capture_qkv_compressed(model: LlamaModel, seqs: torch.Tensor, spec: EvictionSpec, chunk: int, batch: int = 4,
                           progress=None) -> list[dict]:
    """Like capture_qkv, but each layer's output is the policy's compressed attention (the engine
    with the base policy, no LESS, chunked prefill): Q/K/V as the serving run sees them."""
    a = model.args
    N, T = seqs.shape
    Hkv, D, B = a.num_kv_heads, a.head_dim, spec.budget
    dev = next(model.parameters()).device
    out = [{n: torch.empty(N, h, T, D) for n, h in (("q", a.num_heads), ("k", Hkv), ("v", Hkv))}
           for _ in range(a.num_layers)]
    for s in range(0, N, batch):
        e = min(N, s + batch)
        n = e - s
        slots = torch.arange(n, device=dev)
        caches = [dict(k=torch.zeros(n, Hkv, B, D, device=dev), v=torch.zeros(n, Hkv, B, D, device=dev),
                       pos=torch.full((n, Hkv, B), -1, dtype=torch.int32, device=dev),
                       score=torch.zeros(n, Hkv, B, device=dev),
                       length=torch.zeros(n, dtype=torch.int32, device=dev))
                  for _ in range(a.num_layers)]
        for lo in range(0, T, chunk):
            hi = min(T, lo + chunk)
            pos = torch.arange(lo, hi, device=dev)[None].expand(n, hi - lo)

            def attend(layer, q, k, v, s=s, e=e, lo=lo, hi=hi, pos=pos, caches=caches, slots=slots):
                c = caches[layer]
                out[layer]["q"][s:e, :, lo:hi] = q.float().cpu()
                out[layer]["k"][s:e, :, lo:hi] = k.float().cpu()
                out[layer]["v"][s:e, :, lo:hi] = v.float().cpu()
                o, m_cache, m_new = chunk_attention_ref(q, k, v, c["k"], c["v"], c["length"], slots, D**-0.5)
                c["length"] = evict_absorb_ref(c["k"], c["v"], c["pos"], c["score"], c["length"], slots,
                                               k, v, pos, m_cache, m_new, spec)
                return o

            model(seqs[s:e, lo:hi].to(dev), pos, attend, last_only=True)
        if progress:
            progress(n)
    return out


@torch.inference_mode()
def eviction_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: EvictionSpec,
                    chunk: int) -> torch.Tensor:
    """q [N, Hq, T, D], k/v [N, Hkv, T, D] -> e [N, Hkv, T] int32: the chunk index at whose end
    each key was evicted (num_chunks = never). A query in chunk c attends sparsely to keys with
    e >= c (causal) and through the low-rank state to keys with e < c. Lambda's eviction depends
    on positions only and is computed in closed form (equal to the replay: tested); h2o's is replayed."""
    if spec.mode == "lambda":
        return lambda_eviction_chunks(k.shape[0], k.shape[1], k.shape[2], spec, chunk, k.device)
    return replay_eviction_chunks(q, k, v, spec, chunk)


def lambda_eviction_chunks(N: int, Hkv: int, T: int, spec: EvictionSpec, chunk: int,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """Lambda keeps the first `sink` keys and the last `recent` (sink + recent = budget): after a
    chunk ending at hi, key i >= sink is gone once i < hi - recent. -> e [N, Hkv, T] int32."""
    n_chunks = -(-T // chunk)
    i = torch.arange(T, device=device)
    c = (i + spec.recent) // chunk  # first chunk whose end passes i + recent
    hi = torch.clamp((c + 1) * chunk, max=T)
    gone = (i >= spec.sink) & (c < n_chunks) & (hi > i + spec.recent)
    e = torch.where(gone, c, torch.full_like(c, n_chunks)).to(torch.int32)
    return e.expand(N, Hkv, T).contiguous()


@torch.inference_mode()
def replay_eviction_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: EvictionSpec,
                           chunk: int) -> torch.Tensor:
    """eviction_chunks by replaying the engine's chunked prefill with its reference ops (any policy)."""
    N, Hkv, T, D = k.shape
    n_chunks = -(-T // chunk)
    B = spec.budget
    dev = k.device
    k_cache = torch.zeros(N, Hkv, B, D, dtype=k.dtype, device=dev)
    v_cache = torch.zeros_like(k_cache)
    pos_cache = torch.full((N, Hkv, B), -1, dtype=torch.int32, device=dev)
    score = torch.zeros(N, Hkv, B, dtype=torch.float32, device=dev)
    length = torch.zeros(N, dtype=torch.int32, device=dev)
    slots = torch.arange(N, device=dev)
    e = torch.full((N, Hkv, T), n_chunks, dtype=torch.int32, device=dev)
    scale = q.shape[-1] ** -0.5
    for c in range(n_chunks):
        lo, hi = c * chunk, min(T, (c + 1) * chunk)
        kc, vc = k[:, :, lo:hi], v[:, :, lo:hi]
        _, m_cache, m_new = chunk_attention_ref(q[:, :, lo:hi], kc, vc, k_cache, v_cache, length, slots, scale)
        positions = torch.arange(lo, hi, device=dev)[None].expand(N, hi - lo)
        length = evict_absorb_ref(k_cache, v_cache, pos_cache, score, length, slots, kc, vc, positions,
                                  m_cache, m_new, spec)
        alive = torch.zeros(N, Hkv, T + 1, dtype=torch.bool, device=dev)
        alive.scatter_(2, pos_cache.long().masked_fill(pos_cache < 0, T), True)
        gone = ~alive[..., :hi] & (e[..., :hi] == n_chunks)
        e[..., :hi] = e[..., :hi].masked_fill(gone, c)
    return e


def save_layer(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.contiguous() for k, v in tensors.items()}, tmp)
    tmp.rename(path)


def load_layer(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)
