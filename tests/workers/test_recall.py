"""`+recall` on a tiny random Llama, checked against oracles: the slot never holds more than the
budget, every slot entry is the history's K/V at its position, the LESS state equals a
from-scratch sum over the tokens not in the slot after many recall rounds, recalled pages come back
pinned and stay through the reply, offload / restore and forks carry the history, the host budget
drops the oldest pages of the coldest session first, and without a recall round the policy is its
base policy exactly."""

from __future__ import annotations

import pytest
import torch

from lessserve.kernels.reference.evict import PIN_SCORE
from lessserve.kernels.reference.lowrank import psi_ref
from lessserve.kernels.reference.recall import page_scores, page_summaries
from lessserve.workers.config import EngineConfig
from lessserve.workers.device_tier import EngineDeviceTier
from lessserve.workers.engine import Engine
from lessserve.workers.errors import ConfigError
from tests.conftest import tiny_less

BUDGET, PAGE, PAGES, CHUNK = 16, 2, 2, 8


def engine(ckpt, policy="h2o+less+recall", **kw) -> Engine:
    cfg = dict(model="tiny", policy=policy, budget=BUDGET, prefill_chunk=CHUNK, max_slots=4, device="cpu",
               dtype="float32", recall_page=PAGE, recall_pages=PAGES, recall_queries=4)
    return Engine(EngineConfig(**{**cfg, **kw}), checkpoint=ckpt, less=tiny_less() if "less" in policy else None)


def turns(eng: Engine, slot: int, n_turns: int = 5, seed: int = 0, reply: int = 3) -> None:
    """Turns of random tokens: each prompt prefilled in chunks with recall on its last, then a reply."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_turns):
        ids = torch.randint(0, 128, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g)
        for off, size in eng.chunks(eng.slab.seen[slot], len(ids)):
            last = off + size == len(ids)
            eng.forward([slot], ids[None, off : off + size], last_only=True, recall=last)
        for _ in range(reply):
            eng.decode([slot], [int(torch.randint(0, 128, (1,), generator=g))])


def check_slot_against_history(eng: Engine, slot: int) -> None:
    """Every entry is the history's K/V at its position; positions ascend; length <= budget; the
    LESS state is the sum over every other token the session consumed."""
    h = eng.histories.get(slot)
    n = int(eng.slab.length[slot])
    assert n <= eng.spec.budget and h.base == 0 and h.n == eng.slab.seen[slot]
    for layer in range(eng.args.num_layers):
        pos = eng.slab.pos[layer, slot, :, :n].long()  # [Hkv, n]
        assert bool((pos[:, 1:] > pos[:, :-1]).all()), "entries out of position order"
        for hd in range(eng.args.num_kv_heads):
            assert torch.equal(eng.slab.k[layer, slot, hd, :n], h.k[layer, hd, pos[hd]])
            assert torch.equal(eng.slab.v[layer, slot, hd, :n], h.v[layer, hd, pos[hd]])
        if eng.less is not None:
            out = torch.ones(eng.args.num_kv_heads, h.n, dtype=torch.bool)
            out.scatter_(1, pos, False)  # tokens not in the slot
            f = psi_ref(h.keys(layer)[None], eng.less.layers[layer])[0] * out[..., None]  # [Hkv, T, R]
            H = torch.einsum("htr,htd->hrd", f, h.values(layer).float())
            torch.testing.assert_close(eng.slab.H[layer, slot], H, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(eng.slab.z[layer, slot], f.sum(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["h2o+less+recall", "lambda+less+recall", "h2o+recall"])
def test_slot_and_less_state_match_a_recomputation_after_many_recall_rounds(tiny_ckpt, policy):
    eng = engine(tiny_ckpt, policy)
    slot = eng.alloc()
    for t in range(6):
        turns(eng, slot, n_turns=1, seed=t)
        check_slot_against_history(eng, slot)
    assert eng.histories.get(slot).recalled > 0, "no recall round brought anything back"


def test_a_recalled_page_is_the_best_bound_and_stays_pinned_through_the_reply(tiny_ckpt):
    eng = engine(tiny_ckpt, "lambda+recall", recall_pages=1)
    slot = eng.alloc()
    turns(eng, slot, n_turns=4, seed=3, reply=0)
    h = eng.histories.get(slot)
    seen_q = {}
    inner = eng.model.forward

    def spy(tokens, positions, attend, last_only=False):
        def wrapped(layer, q, k, v):
            seen_q.setdefault(layer, q[0, :, -4:].clone())
            return attend(layer, q, k, v)
        return inner(tokens, positions, wrapped, last_only)

    before = {layer: set(eng.slab.pos[layer, slot, 0].tolist()) for layer in range(eng.args.num_layers)}
    n_pages = h.pages
    kmin, kmax = page_summaries(h.keys(0)[:, : n_pages * PAGE], PAGE)
    eng.model.forward = spy
    eng.forward([slot], torch.tensor([[5, 6, 7]]), last_only=True, recall=True)
    eng.model.forward = inner
    q0 = seen_q[0].reshape(eng.args.num_kv_heads, -1, eng.args.head_dim)
    bound = page_scores(q0, kmin, kmax)[0]  # KV head 0
    wholly = torch.tensor([all(p * PAGE + i in before[0] for i in range(PAGE)) for p in range(n_pages)])
    best = int(bound.masked_fill(wholly, float("-inf")).argmax())
    pinned = eng.slab.score[0, slot, 0] >= PIN_SCORE
    got = set(eng.slab.pos[0, slot, 0][pinned].tolist())
    assert got == {best * PAGE, best * PAGE + 1}
    for t in range(6):  # a reply: lambda would evict old positions at once; pinned ones stay
        eng.decode([slot], [t + 1])
        assert got <= set(eng.slab.pos[0, slot, 0].tolist())
    turns(eng, slot, n_turns=1, seed=9, reply=0)  # the next round unpins them (and may pick others)
    assert (eng.slab.score[:, slot] >= PIN_SCORE).sum() <= eng.args.num_layers * eng.args.num_kv_heads * PAGE


@pytest.mark.parametrize("base", ["h2o+less", "lambda+less"])
def test_without_a_recall_round_the_policy_is_its_base_policy(tiny_ckpt, base):
    a, b = engine(tiny_ckpt, base), engine(tiny_ckpt, base + "+recall")
    sa, sb = a.alloc(), b.alloc()
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(1))
    for off in range(0, 60, CHUNK):
        la = a.forward([sa], ids[:, off : off + CHUNK])
        lb = b.forward([sb], ids[:, off : off + CHUNK])
        assert torch.equal(la, lb)
    assert torch.equal(a.slab.pos[:, sa], b.slab.pos[:, sb])
    assert b.stats(sb)["history_tokens"] == 60


def test_offload_restore_and_fork_carry_the_history(tiny_ckpt):
    eng = engine(tiny_ckpt)
    tier = EngineDeviceTier(eng)
    slot = tier.new_slot("a")
    turns(eng, slot, n_turns=4)
    h = eng.histories.get(slot)
    blob = tier.get("a")
    tier.delete("a")
    assert slot not in eng.histories.by_slot  # a freed slot drops its history
    other = engine(tiny_ckpt)
    tier2 = EngineDeviceTier(other)
    tier2.put("b", blob)
    s2 = tier2.slot_of("b")
    h2 = other.histories.get(s2)
    assert (h2.base, h2.n, h2.recalled) == (h.base, h.n, h.recalled)
    assert torch.equal(h2.keys(1), h.keys(1)) and torch.equal(h2.values(0), h.values(0))
    assert torch.equal(h2.kmax, h.kmax)
    fork = other.alloc()
    other.slab.copy(s2, fork)
    turns(other, s2, n_turns=1, seed=7)
    turns(other, fork, n_turns=1, seed=7)
    assert torch.equal(other.slab.k[:, s2], other.slab.k[:, fork])  # same state, same turn: same result
    check_slot_against_history(other, fork)


def test_host_budget_drops_the_oldest_pages_of_the_coldest_session_first(tiny_ckpt):
    probe = engine(tiny_ckpt)
    s = probe.alloc()
    turns(probe, s, n_turns=3)
    per_token = probe.histories.get(s).nbytes() / probe.histories.get(s).held
    eng = engine(tiny_ckpt, history_bytes=int(per_token * 90))
    cold, hot = eng.alloc(), eng.alloc()
    turns(eng, cold, n_turns=3, seed=1)
    turns(eng, hot, n_turns=6, seed=2)  # the pool overflows while `hot` is the one in use
    hc, hh = eng.histories.get(cold), eng.histories.get(hot)
    assert eng.histories.nbytes() <= eng.cfg.history_bytes
    assert hc.base > 0 and eng.histories.pages_dropped > 0
    assert hc.base % PAGE == 0 and hc.k.shape[2] >= hc.held
    if hh.base > 0:  # the hot one loses pages only once the cold one has none left
        assert hc.pages == 0
    turns(eng, cold, n_turns=2, seed=4)  # degraded: still served, recall from what is left
    assert eng.slab.length[cold] <= BUDGET


def test_recall_pages_must_fit_beside_the_protected_entries(tiny_ckpt):
    with pytest.raises(ConfigError, match="recall pages"):
        engine(tiny_ckpt, "h2o+recall", recall_pages=5, recall_page=2)  # 10 > 16 - recent 8
    with pytest.raises(ConfigError, match="recall pages"):
        engine(tiny_ckpt, "lambda+recall", recall_pages=6, recall_page=2, sink=4)  # 4 + 12 = 16
    assert engine(tiny_ckpt, "lambda+recall", recall_pages=5, recall_page=2).spec.recent == BUDGET - 4 - 10


def test_page_bound_is_an_upper_bound_on_every_logit():
    g = torch.Generator().manual_seed(0)
    k, q = torch.randn(3, 64, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    kmin, kmax = page_summaries(k, 4)
    bound = page_scores(q, kmin, kmax)  # [3, 16]
    exact = (q @ k.transpose(1, 2)).view(3, 5, 16, 4).amax(-1).amax(1)
    assert bool((bound >= exact - 1e-5).all())
    one = page_scores(q, *page_summaries(k, 1))  # a page of one token: the bound is the logit itself
    torch.testing.assert_close(one, (q @ k.transpose(1, 2)).amax(1))
