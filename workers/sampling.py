"""Token sampling: greedy at temperature 0, else temperature + nucleus; the log-probabilities a
client may ask for (OpenAI `logprobs` / `top_logprobs`), from the model's own distribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-6  # a temperature this small is greedy (below float32's range it would divide by 0)

TopLogprobs = tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class Sampled:
    """One sampled token of a request, as the scheduler streams it."""

    token: int
    index: int = 0  # the choice it belongs to (n > 1: each choice decodes in its own forked slot)
    logprob: float | None = None  # log p(token) under the model's logits (before temperature or masks)
    top: TopLogprobs = ()  # the top_logprobs most likely tokens at this step


@dataclass(frozen=True, slots=True)
class PromptLogprobs:
    """Log-probabilities of a request's prompt tokens, computed by its (compressed) prefill: entry i
    is log p(ids[i] | ids[:i]); the first token has none. Streamed once, before the first Sampled."""

    logprobs: list[float | None]
    top: list[TopLogprobs]


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


def logprobs_at(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[list[float], list[TopLogprobs]]:
    """logits [T, V], targets [T] -> (log p(targets[t]) per row, the k most likely (id, logprob) per row)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    chosen = lp.gather(-1, targets[:, None].to(lp.device))[:, 0].tolist()
    if k <= 0:
        return chosen, [()] * len(chosen)
    vals, ids = lp.topk(k, dim=-1)  # [T, k]
    top = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
    return chosen, top
