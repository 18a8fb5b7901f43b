"""Paired bootstrap over evaluation windows: 95% intervals on gap-closed figures.

Every policy is evaluated on the same windows, so one resample of window indices is applied to all
of them at once (paired): the interval reflects which windows happened to be drawn, not noise
that the policies share. Perplexity of a resample = exp(sum of its windows' NLL / their tokens).
"""

from __future__ import annotations

import math

import torch

RESAMPLES = 2000


def _ppl(nll: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """nll/tokens [W]; idx [B, W] resampled window indices -> ppl [B]."""
    return torch.exp(nll[idx].sum(-1) / tokens[idx].sum(-1))


def gap_closed_ci(full: list[float], base: list[float], other: list[float], tokens: list[int],
                  resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95,
                  versus: list[float] | None = None) -> dict:
    """Per-window NLL sums of the full cache, the base policy and a compressed variant (`other`),
    and predicted tokens per window -> {"value", "low", "high"} of
    (ppl_base - ppl_other) / (ppl_base - ppl_full), percentile interval over window resamples;
    with `versus` (another variant's per-window NLL), also the interval of the difference
    gap(other) - gap(versus) ("diff_low", "diff_high", "diff")."""
    W = len(tokens)
    n = torch.tensor(tokens, dtype=torch.float64)
    f, b, o = (torch.tensor(x, dtype=torch.float64) for x in (full, base, other))
    everything = torch.arange(W)[None]

    def gap(x, idx):
        pb, pf = _ppl(b, n, idx), _ppl(f, n, idx)
        return (pb - _ppl(x, n, idx)) / (pb - pf)

    out = {"value": float(gap(o, everything)[0]), "windows": W}
    if W < 2:
        return {**out, "low": math.nan, "high": math.nan}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(W, (resamples, W), generator=g)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    s = gap(o, idx)
    s = s[torch.isfinite(s)]
    out.update(low=float(s.quantile(lo_q)), high=float(s.quantile(hi_q)))
    if versus is not None:
        v = torch.tensor(versus, dtype=torch.float64)
        d = gap(o, idx) - gap(v, idx)
        d = d[torch.isfinite(d)]
        out.update(diff=float(gap(o, everything)[0] - gap(v, everything)[0]), diff_low=float(d.quantile(lo_q)),
                   diff_high=float(d.quantile(hi_q)))
    return out


def ppl_ratio_ci(nll: list[float], ref: list[float], tokens: list[int], resamples: int = RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Per-unit NLL sums of a variant and of its reference on the same units (windows, or blocks of
    tokens), and tokens per unit -> {"value", "low", "high"} of ppl / ppl_ref - 1 in percent,
    percentile interval over paired unit resamples."""
    U = len(tokens)
    n = torch.tensor(tokens, dtype=torch.float64)
    x, r = (torch.tensor(v, dtype=torch.float64) for v in (nll, ref))
    every = torch.arange(U)[None]
    value = float(100 * (_ppl(x, n, every) / _ppl(r, n, every) - 1)[0])
    if U < 2:
        return {"value": value, "low": math.nan, "high": math.nan}
    idx = torch.randint(U, (resamples, U), generator=torch.Generator().manual_seed(seed))
    s = 100 * (_ppl(x, n, idx) / _ppl(r, n, idx) - 1)
    return {"value": value, "low": float(s.quantile((1 - level) / 2)), "high": float(s.quantile((1 + level) / 2))}
