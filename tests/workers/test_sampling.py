"""Sampling stays a distribution over the vocabulary at any temperature the API accepts."""

import torch

from lessserve.workers.sampling import sample


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 5
    for t in (1.37e-120, 1e-30, 1e-6):  # 1.37e-120: the float the OpenAPI fuzzer sent
        assert torch.equal(sample(logits, temperature=t), logits.argmax(-1))


def test_temperature_and_top_p_draw_only_from_the_nucleus():
    logits = torch.tensor([[4.0, 3.9, -2.0, -3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, temperature=2.0, top_p=0.5, generator=g)[0]) for _ in range(200)}
    assert draws <= {0, 1} and draws  # the two near-equal best tokens hold over half the mass
    draws = {int(sample(logits, temperature=2.0, generator=g)[0]) for _ in range(400)}
    assert draws == {0, 1, 2, 3}
