"""Engine semantics under every policy, on a tiny random Llama (fast, exact)."""

import pytest
import torch

from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.model import causal_attend
from tests.conftest import tiny_less

POLICIES = ["full", "h2o", "lambda", "h2o+less", "lambda+less"]


def make(ckpt, policy="h2o", budget=16, chunk=8, slots=4, **kw):
    less = tiny_less(ckpt.args) if policy.endswith("+less") else None
    cfg = EngineConfig(model="tiny", policy=policy, budget=budget, prefill_chunk=chunk, max_slots=slots,
                       max_context=4096, **kw)
    return Engine(cfg, checkpoint=ckpt, less=less)


def ids(n, seed=0):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_covering_everything_reproduces_full_logits(tiny_ckpt, policy):
    e = make(tiny_ckpt, policy, budget=64, chunk=7)
    toks = ids(50)
    s = e.alloc()
    got = e.prefill(s, toks, all_logits=True)
    with torch.no_grad():
        ref = e.model(torch.tensor([toks]), torch.arange(50)[None], causal_attend)[0]
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    if e.less is not None:
        assert float(e.slab.z[:, s].abs().sum()) == 0.0  # nothing evicted, nothing absorbed


@pytest.mark.parametrize("policy", ["h2o", "lambda", "h2o+less", "lambda+less"])
def test_chunk_size_one_equals_token_by_token_decode(tiny_ckpt, policy):
    toks = ids(40, seed=1)
    a = make(tiny_ckpt, policy, budget=12, chunk=1)
    sa = a.alloc()
    pre = a.prefill(sa, toks, all_logits=True)
    b = make(tiny_ckpt, policy, budget=12, chunk=64)
    sb = b.alloc()
    dec = torch.stack([b.decode([sb], [t])[0] for t in toks])
    assert torch.allclose(pre, dec, atol=1e-5)
    assert int(a.slab.length[sa]) == 12 and a.slab.seen[sa] == 40


@pytest.mark.parametrize("policy", ["h2o", "lambda+less", "h2o+less"])
def test_two_turns_equal_one_pass(tiny_ckpt, policy):
    toks = ids(88, seed=2)
    one = make(tiny_ckpt, policy, budget=16, chunk=8)
    s1 = one.alloc()
    ref = one.prefill(s1, toks)
    two = make(tiny_ckpt, policy, budget=16, chunk=8)
    s2 = two.alloc()
    two.prefill(s2, toks[:48])
    got = two.prefill(s2, toks[48:])  # only the new tokens
    assert two.slab.seen[s2] == 88
    assert torch.allclose(got, ref, atol=1e-5)
    for f in ("k", "v", "pos", "score", "H", "z"):
        assert torch.allclose(getattr(one.slab, f)[:, s1].float(), getattr(two.slab, f)[:, s2].float(), atol=1e-5), f


@pytest.mark.parametrize("policy", ["full", "h2o", "lambda+less"])
def test_batched_decode_equals_each_session_alone(tiny_ckpt, policy):
    lengths = [5, 23, 40]
    e = make(tiny_ckpt, policy, budget=16, chunk=8)
    solo = make(tiny_ckpt, policy, budget=16, chunk=8)
    slots, solo_slots = [], []
    for i, n in enumerate(lengths):
        slots.append(e.alloc())
        solo_slots.append(solo.alloc())
        e.prefill(slots[-1], ids(n, seed=10 + i))
        solo.prefill(solo_slots[-1], ids(n, seed=10 + i))
    nxt = [1, 2, 3]
    for _ in range(6):
        batched = e.decode(slots, nxt)
        alone = torch.stack([solo.decode([s], [t])[0] for s, t in zip(solo_slots, nxt, strict=True)])
        assert torch.allclose(batched, alone, atol=1e-5)
        nxt = batched.argmax(-1).tolist()


def test_slot_memory_constant_in_conversation_length(tiny_ckpt):
    e = make(tiny_ckpt, "h2o+less", budget=32, chunk=64, slots=2)
    s = e.alloc()
    e.prefill(s, ids(200, seed=4))
    bytes_200, slab_200 = e.stats(s)["cache_bytes"], e.slab.total_bytes()
    e.prefill(s, ids(1800, seed=5))
    st = e.stats(s)
    assert st["tokens_seen"] == 2000
    assert st["cached_tokens"] == 32
    assert st["cache_bytes"] == bytes_200 and e.slab.total_bytes() == slab_200
    assert float(e.slab.z[:, s].sum()) > 0  # evicted tokens were absorbed
    positions = e.slab.pos[:, s]
    assert int(positions.max()) == 1999 and int((positions >= 0).sum(-1).min()) == 32
