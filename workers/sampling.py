"""Token sampling: greedy at temperature 0, else temperature + nucleus."""

from __future__ import annotations

import torch

GREEDY_BELOW = 1e-6  # a temperature this small is greedy (below float32's range it would divide by 0)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [n, V] -> token ids [n]."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # shifted so the best logit is 0 before dividing: a tiny temperature gives -inf elsewhere
    # (greedy in the limit), never inf - inf = NaN
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
