"""What one window gives the streaming per-layer stage, in memory and on the model's device.

`capture_layers` is capture_qkv (training/capture.py) that also keeps each layer's full causal
attention output, which the forward computes anyway: it is the training target (o_full), so no
[P, T] attention is recomputed per layer. `sparse_batch` builds layer.prepare_layer's LayerBatch
for chosen query chunks from it: the sparse part of query chunk c is the cache the engine holds
after chunk c-1 (keys i < c*chunk with e_i >= c, at most the budget) plus its own chunk causally,
so it gathers budget + chunk keys per chunk instead of scoring all T (as e2e.sparse_attention).
Both equal the existing functions (tests/training/test_stream.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lessserve.training.layer import LayerBatch
from lessserve.workers.model import LlamaModel


@torch.no_grad()
def capture_layers(model: LlamaModel, tokens: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """tokens [n, T] -> per layer {"q": [n, Hq, T, D], "k"/"v": [n, Hkv, T, D], "o": [n, Hq, T, D]}
    (fp32, on the model's device; o = full causal attention before o_proj)."""
    dev = next(model.parameters()).device
    n, T = tokens.shape
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(model.args.num_layers)]

    def attend(layer, q, k, v):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [n, Hq, T, D]
        out[layer].update(q=q.float(), k=k.float(), v=v.float(), o=o.float())
        return o

    model(tokens.to(dev), torch.arange(T, device=dev)[None].expand(n, T), attend, last_only=True)
    return out


def sparse_batch(layer: dict[str, torch.Tensor], e: torch.Tensor, chunk: int, chunks: torch.Tensor) -> LayerBatch:
    """One layer's capture and eviction record e [n, Hkv, T] -> the LayerBatch of prepare_layer for
    the query chunk ids `chunks` [Cq] (ascending; the query positions of those chunks)."""
    q, k, v, o = layer["q"], layer["k"], layer["v"], layer["o"]
    n, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G, Cq, dev = Hq // Hkv, len(chunks), q.device
    cs = chunks.to(dev)
    t = torch.arange(T, device=dev)
    cached = (e[:, :, None, :] >= cs[:, None]) & (t < (cs * chunk)[:, None])  # [n, Hkv, Cq, T]
    W = max(int(cached.sum(-1).max()), 1)
    idx = cached.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[..., :W]  # [n, Hkv, Cq, W]
    valid = cached.gather(-1, idx)  # [n, Hkv, Cq, W]
    own = (cs[:, None] * chunk + torch.arange(chunk, device=dev)).expand(n, Hkv, Cq, chunk)  # [n, Hkv, Cq, C]
    idx = torch.cat([idx, own], -1).flatten(2)[..., None].expand(-1, -1, -1, D)  # [n, Hkv, Cq*(W+C), D]
    kk = k.gather(2, idx).view(n, Hkv, Cq, W + chunk, D)
    vv = v.gather(2, idx).view(n, Hkv, Cq, W + chunk, D)
    pos = own[0, 0].flatten()  # [P] query positions
    qs = q[:, :, pos]  # [n, Hq, P, D]
    s = torch.einsum("nhgcqd,nhckd->nhgcqk", qs.view(n, Hkv, G, Cq, chunk, D), kk) * D**-0.5
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=dev).tril()
    mask = torch.cat([valid[:, :, None, :, None, :].expand(n, Hkv, 1, Cq, chunk, W),
                      causal.expand(n, Hkv, 1, Cq, chunk, chunk)], -1)  # [n, Hkv, 1, Cq, C, W+C]
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)  # [n, Hkv, G, Cq, C]
    o_s = torch.einsum("nhgcqk,nhckd->nhgcqd", torch.exp(s - lse[..., None]), vv)
    return LayerBatch(k=k, v=v, e=e, q=qs, o_sparse=o_s.reshape(n, Hq, Cq * chunk, D),
                      lse=lse.reshape(n, Hq, Cq * chunk), o_full=o[:, :, pos], q_chunk=pos // chunk)
