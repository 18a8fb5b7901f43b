"""LESS feature maps (torch reference): phi for queries, psi for evicted keys.

phi(q) = | gelu(gelu(q W1q) W2q) |                         per query head
a      = |s1| * gelu(gelu(k W1k) W2k);  psi(k) = | a + (a Wint) * s2 |   per KV head
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LessLayerWeights:
    """One layer's phi/psi weights. R' = hidden width, R = rank."""

    w1q: torch.Tensor  # [Hq, D, R']
    w2q: torch.Tensor  # [Hq, R', R]
    w1k: torch.Tensor  # [Hkv, D, R']
    w2k: torch.Tensor  # [Hkv, R', R]
    wint: torch.Tensor  # [Hkv, R, R]
    s1: torch.Tensor  # [Hkv, R]
    s2: torch.Tensor  # [Hkv, R]

    @property
    def rank(self) -> int:
        return self.w2q.shape[-1]

    def to(self, device=None, dtype=None) -> LessLayerWeights:
        return LessLayerWeights(**{k: v.to(device=device, dtype=dtype) for k, v in vars(self).items()})


def phi_ref(q: torch.Tensor, w: LessLayerWeights, dropout: float = 0.0) -> torch.Tensor:
    """q: [..., Hq, T, D] -> phi(q): [..., Hq, T, R] (fp32)."""
    h = F.gelu(torch.einsum("...htd,hde->...hte", q.float(), w.w1q.float()))
    if dropout:
        h = F.dropout(h, dropout, training=True)
    return F.gelu(torch.einsum("...hte,her->...htr", h, w.w2q.float())).abs()


def psi_ref(k: torch.Tensor, w: LessLayerWeights, dropout: float = 0.0) -> torch.Tensor:
    """k: [..., Hkv, T, D] -> psi(k): [..., Hkv, T, R] (fp32)."""
    h = F.gelu(torch.einsum("...htd,hde->...hte", k.float(), w.w1k.float()))
    if dropout:
        h = F.dropout(h, dropout, training=True)
    a = F.gelu(torch.einsum("...hte,her->...htr", h, w.w2k.float()))
    a = w.s1.float().abs()[:, None, :] * a
    return (a + torch.einsum("...htr,hrs->...hts", a, w.wint.float()) * w.s2.float()[:, None, :]).abs()
