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
from lessserve.kernels.reference.recall import (
    choose_pages,
    glued_pages,
    group_queries,
    history_page_mass,
    redundant_pages,
    top_heads_score,
)
from lessserve.workers.config import EngineConfig
from lessserve.workers.device_tier import EngineDeviceTier
from lessserve.workers.engine import Engine
from lessserve.workers.errors import ConfigError
from tests.conftest import tiny_less

BUDGET, PAGE, PAGES, CHUNK, QUERIES = 16, 2, 2, 8, 3


def engine(ckpt, policy="h2o+less+recall", **kw) -> Engine:
    cfg = dict(model="tiny", policy=policy, budget=BUDGET, prefill_chunk=CHUNK, max_slots=4, device="cpu",
               dtype="float32", recall_page=PAGE, recall_pages=PAGES, recall_queries=QUERIES,
               recall_lead=PAGE)
    return Engine(EngineConfig(**{**cfg, **kw}), checkpoint=ckpt, less=tiny_less() if "less" in policy else None)


def prompt(eng: Engine, slot: int, ids: torch.Tensor) -> None:
    """A turn's prompt as the scheduler feeds a +recall engine: chunks, the last one with the recall round."""
    for off, size in eng.chunks(eng.slab.seen[slot], len(ids)):
        eng.forward([slot], ids[None, off : off + size], last_only=True, recall=off + size == len(ids))


def turns(eng: Engine, slot: int, n_turns: int = 5, seed: int = 0, reply: int = 3, end: bool = True) -> None:
    """Turns of random tokens: each prompt with its recall round, then a reply, then (end) the turn's
    end as the scheduler sees it: the lent pages go back."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_turns):
        prompt(eng, slot, torch.randint(0, 128, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g))
        for _ in range(reply):
            eng.decode([slot], [int(torch.randint(0, 128, (1,), generator=g))])
        if end:
            eng.end_turn([slot])


def check_slot_against_history(eng: Engine, slot: int) -> None:
    """Every entry is the history's K/V at its position; positions ascend; length <= budget; the
    LESS state is the sum over every other token the session consumed."""
    h = eng.histories.get(slot)
    n = int(eng.slab.length[slot])
    assert n <= eng.spec.budget and h.base == 0 and h.n == eng.slab.seen[slot]
    hk, hv = h.tensors()  # [L, Hkv, T, D]
    for layer in range(eng.args.num_layers):
        pos = eng.slab.pos[layer, slot, :, :n].long()  # [Hkv, n]
        assert bool((pos[:, 1:] > pos[:, :-1]).all()), "entries out of position order"
        for hd in range(eng.args.num_kv_heads):
            assert torch.equal(eng.slab.k[layer, slot, hd, :n], hk[layer, hd, pos[hd]])
            assert torch.equal(eng.slab.v[layer, slot, hd, :n], hv[layer, hd, pos[hd]])
        if eng.less is not None:
            out = torch.ones(eng.args.num_kv_heads, h.n, dtype=torch.bool)
            out.scatter_(1, pos, False)  # tokens not in the slot
            f = psi_ref(hk[layer][None], eng.less.layers[layer])[0] * out[..., None]  # [Hkv, T, R]
            H = torch.einsum("htr,htd->hrd", f, hv[layer].float())
            torch.testing.assert_close(eng.slab.H[layer, slot], H, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(eng.slab.z[layer, slot], f.sum(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("end", [True, False], ids=["turn-ends", "ends-unseen"])
@pytest.mark.parametrize("reread,layer", [(1, 0), (64, 0), (3, 1), (64, 1)])  # (64, 1): one pass per prompt
@pytest.mark.parametrize("policy", ["h2o+less+recall", "lambda+less+recall", "h2o+recall"])
def test_slot_and_less_state_match_a_recomputation_after_many_recall_rounds(tiny_ckpt, policy, reread, layer, end):
    eng = engine(tiny_ckpt, policy, recall_reread=reread,  # 64: the whole last chunk, up to the recent window
                 recall_layer=layer)
    slot = eng.alloc()
    for t in range(6):
        turns(eng, slot, n_turns=1, seed=t, end=end)  # without the turn's end, the next round returns the pages
        check_slot_against_history(eng, slot)
        assert (eng.slab.score[:, slot] >= PIN_SCORE).any() != end  # pinned through the reply, not after it
    assert eng.histories.get(slot).recalled > 0, "no recall round brought anything back"


@pytest.mark.parametrize("policy", ["h2o+less+recall", "lambda+recall"])
def test_a_turns_end_gives_back_what_its_round_replaced(tiny_ckpt, policy, monkeypatch):
    """Right after the round, the turn's end restores the slot the step left: the same positions,
    eviction scores, K/V (the re-read tokens' too) and LESS state. After a reply long enough to evict
    re-read tokens, the entries the round replaced are back and the recalled ones gone (they were
    pinned, nothing else could have moved them), with no pin left, and the slot, history and LESS
    state agree with the step's K/V."""
    eng = engine(tiny_ckpt, policy, recall_reread=3)
    slot = eng.alloc()
    turns(eng, slot, n_turns=4, seed=2, reply=2)
    before = {}
    original = eng._bring_back

    def snapshot(*a, **kw):
        sl = eng.slab
        before.update(pos=sl.pos[:, slot].clone(), score=sl.score[:, slot].clone(), k=sl.k[:, slot].clone(),
                      v=sl.v[:, slot].clone(), hist=[t.clone() for t in eng.histories.get(slot).tensors()],
                      H=sl.H[:, slot].clone() if eng.less else None, z=sl.z[:, slot].clone() if eng.less else None)
        return original(*a, **kw)

    monkeypatch.setattr(eng, "_bring_back", snapshot)
    h = eng.histories.get(slot)
    brought = h.recalled
    prompt(eng, slot, torch.tensor([9, 10, 11, 12]))
    assert h.recalled > brought and h.lent is not None
    assert not torch.equal(eng.slab.pos[:, slot], before["pos"])
    eng.end_turn([slot])
    sl, n = eng.slab, int(eng.slab.length[slot])
    assert torch.equal(sl.pos[:, slot], before["pos"]) and torch.equal(sl.score[:, slot], before["score"])
    assert torch.equal(sl.k[:, slot, :, :n], before["k"][:, :, :n]) and torch.equal(sl.v[:, slot], before["v"])
    assert all(torch.equal(a, b) for a, b in zip(h.tensors(), before["hist"], strict=True))
    if eng.less:
        torch.testing.assert_close(sl.H[:, slot], before["H"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sl.z[:, slot], before["z"], rtol=1e-4, atol=1e-4)
    check_slot_against_history(eng, slot)
    prompt(eng, slot, torch.tensor([13, 14, 15]))
    lent = h.lent
    assert lent[-1].read_k is not None and not torch.equal(lent[-1].read_k, lent[-1].new_k)
    for t in range(3 * BUDGET):  # the re-read tokens leave the recent window; eviction absorbs some of them
        eng.decode([slot], [t + 20])
    eng.end_turn([slot])
    assert h.lent is None and not bool((sl.score[:, slot] >= PIN_SCORE).any())
    for layer in range(eng.args.num_layers):
        for hd in range(eng.args.num_kv_heads):
            held = set(sl.pos[layer, slot, hd, : int(sl.length[slot])].tolist())
            assert set(lent[layer].out_pos[hd].tolist()) <= held
            assert not set(lent[layer].back[hd].tolist()) & held
    check_slot_against_history(eng, slot)


def test_the_chosen_pages_are_the_last_queries_best_and_stay_pinned_through_the_reply(tiny_ckpt):
    eng = engine(tiny_ckpt, "lambda+recall")
    slot = eng.alloc()
    turns(eng, slot, n_turns=4, seed=3, reply=0)
    h = eng.histories.get(slot)
    eng.forward([slot], torch.tensor([[5, 6]]), last_only=True)
    eng.forward([slot], torch.tensor([[8]]), last_only=True, recall=True)  # a prompt's last chunk of one token
    kept = torch.stack(h.queries)  # [L, Hq, QUERIES, D]: the last three tokens' (5, 6, 8: across the two steps)
    assert kept.shape[2] == QUERIES
    n_pages, seen = h.pages, eng.slab.seen[slot]
    keys = [h.tensors()[0][layer, :, : n_pages * PAGE] for layer in range(eng.args.num_layers)]
    score = sum(history_page_mass(group_queries(kept[layer], eng.args.num_kv_heads), keys[layer], eng.scale,
                                  PAGE, PAGE).sum(0) for layer in range(eng.args.num_layers))
    first = torch.arange(n_pages) * PAGE
    best = choose_pages(score, PAGES, (first >= seen - eng.spec.recent) | (first + PAGE <= eng.spec.sink))
    want = {int(p) * PAGE + i for p in best for i in range(PAGE)}
    assert len(want) == PAGES * PAGE
    for layer in range(eng.args.num_layers):
        for hd in range(eng.args.num_kv_heads):
            pinned = eng.slab.score[layer, slot, hd] >= PIN_SCORE
            assert set(eng.slab.pos[layer, slot, hd][pinned].tolist()) == want
    for t in range(6):  # a reply: lambda would evict old positions at once; pinned ones stay
        eng.decode([slot], [t + 1])
        assert want <= set(eng.slab.pos[0, slot, 0].tolist())
    turns(eng, slot, n_turns=1, seed=9, reply=0)  # the next round unpins them (and may pick others)
    assert (eng.slab.score[:, slot] >= PIN_SCORE).sum() <= eng.args.num_layers * eng.args.num_kv_heads * PAGES * PAGE


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
    assert all(torch.equal(a, b) for a, b in zip(h2.tensors(), h.tensors(), strict=True))
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
    assert hc.base % PAGE == 0 and hc.capacity >= hc.held
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


def test_page_mass_is_the_best_querys_softmax_mass_per_page_and_head():
    g = torch.Generator().manual_seed(0)
    k, q = torch.randn(3, 64, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    got = history_page_mass(q, k, 0.5, 4)  # [3, 16]
    want = torch.zeros(3, 16)
    for h in range(3):
        p = torch.softmax(q[h] @ k[h].T * 0.5, -1)  # [5, 64]
        want[h] = torch.stack([p[:, i * 4 : i * 4 + 4].sum(1).max() for i in range(16)])
    torch.testing.assert_close(got, want)
    skip = torch.zeros(16, dtype=torch.bool)
    best = want.amax(0)
    skip[best.argmax()] = True
    assert int(best.argmax()) not in choose_pages(got.amax(0), 3, skip).tolist()


def test_a_round_with_nothing_to_bring_back_still_ends_stale_pins(tiny_ckpt):
    """A pin no turn's end returned (a slot restored mid-loan) ends at the next round even when the
    round brings nothing back (every history page is in the recent window)."""
    eng = engine(tiny_ckpt, "h2o+recall")
    slot = eng.alloc()
    eng.forward([slot], torch.tensor([[1, 2, 3, 4]]), last_only=True)
    eng.slab.score[:, slot, :, 0] = PIN_SCORE
    eng.forward([slot], torch.tensor([[5, 6]]), last_only=True, recall=True)
    assert eng.histories.get(slot).recalled == 0
    assert not bool((eng.slab.score[:, slot] >= PIN_SCORE).any())


@pytest.mark.parametrize("lead", [1, 3, 4, 9])
def test_a_pages_lead_counts_the_mass_on_the_tokens_just_before_it(lead):
    """With a lead, page i's mass is the softmax mass on tokens [i * P - lead, (i + 1) * P) (clipped at
    the history's start), keys given whole or in blocks; the max over queries is taken after the sum."""
    g = torch.Generator().manual_seed(1)
    k, q = torch.randn(3, 64, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    got = history_page_mass(q, [k[:, :24], k[:, 24:]], 0.5, 4, lead)  # [3, 16]
    p = torch.softmax(q @ k.transpose(1, 2) * 0.5, -1)  # [3, 5, 64]
    want = torch.stack([p[..., max(i * 4 - lead, 0) : i * 4 + 4].sum(-1) for i in range(16)], -1).amax(1)
    torch.testing.assert_close(got, want)
    # a cue whose mass sits on a page's last token lends it to the page that follows (what the cue says)
    cue = torch.zeros(1, 1, 8)
    keys = torch.zeros(1, 16, 8)
    keys[0, 7] = cue[0, 0] = 4.0  # page 1's last token matches the query
    plain, led = history_page_mass(cue, keys, 1.0, 4, 0)[0], history_page_mass(cue, keys, 1.0, 4, 1)[0]
    assert plain.argmax() == 1 and plain[2] < 0.01 and led[2] > 0.99


def test_a_pages_score_sums_the_layer_heads_that_find_it_most():
    """Page 0 holds what two retrieval heads look for; page 1 gets a little from every head (filler
    that many heads spread mass over). Summed over all 30 layer-heads, page 1 wins; over the top 2
    or 4, page 0 does; each page's own best heads count, not a fixed set of heads."""
    mass = torch.full((30, 3), 0.02)
    mass[:, 1] = 0.06
    mass[3, 0], mass[17, 0] = 0.6, 0.5
    mass[9, 2] = 0.3
    assert top_heads_score(mass, 0).argmax() == 1 and top_heads_score(mass, 30).argmax() == 1
    assert top_heads_score(mass, 2).argmax() == 0 and top_heads_score(mass, 4).argmax() == 0
    torch.testing.assert_close(top_heads_score(mass, 2), torch.tensor([1.1, 0.12, 0.32]))


@pytest.mark.parametrize("reread", [1, 3, 64])
def test_the_reread_tokens_see_the_slot_as_the_step_left_it(tiny_ckpt, reread):
    """The recall round re-reads the prompt's last `recall_reread` tokens (at most the last chunk and
    the recent window) over its slot. While the slot is below its budget nothing was evicted and
    nothing comes back, so the re-read must give the step's own logits; once recall brings pages
    back, the last token's logits (the reply's first) differ from the same step without the round,
    and the prompt's other tokens keep the predictions their step made."""
    eng, plain = engine(tiny_ckpt, recall_reread=reread), engine(tiny_ckpt)
    a, b = eng.alloc(), plain.alloc()
    ids = torch.randint(0, 128, (1, CHUNK), generator=torch.Generator().manual_seed(5))  # < BUDGET: no eviction
    torch.testing.assert_close(eng.forward([a], ids, recall=True), plain.forward([b], ids), rtol=1e-4, atol=1e-4)
    turns(eng, a, n_turns=4, seed=2, reply=0)
    fork = eng.alloc()
    eng.slab.copy(a, fork)
    before = eng.histories.get(a).recalled
    last = torch.tensor([[3, 4, 5]])
    with_round = eng.forward([a], last, recall=True)  # [1, 3, V]
    without = eng.forward([fork], last)
    assert eng.histories.get(a).recalled > before
    # the prompt's own predictions are the step's, made before the round; the reply's first sees the pages
    torch.testing.assert_close(with_round[:, :-1], without[:, :-1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(with_round[:, -1], without[:, -1], rtol=1e-4, atol=1e-4)
    check_slot_against_history(eng, a)


def test_pages_the_recent_window_already_holds_are_redundant():
    """A page is redundant when every trigram within it also occurs among the last `recent` tokens (a
    chat's recurring template line); unknown ids (-1) never are."""
    template, fact = [7, 8, 9, 10], [41, 42, 43, 44]
    ids = torch.tensor(template + fact + template + [50, 51, 52, 53] + template)  # pages of 4
    got = redundant_pages(ids, 4, 5, recent=4)
    assert got.tolist() == [True, False, True, False, True]
    assert redundant_pages(ids, 4, 5, recent=0).tolist() == [False] * 5
    unknown = ids.clone()
    unknown[1] = -1
    assert not bool(redundant_pages(unknown, 4, 5, recent=4)[0])


def test_a_chosen_page_brings_the_pages_its_words_run_into():
    """A number or name cut by a page boundary comes back whole: glued neighbours join the chosen
    page (in the place of lower-scored pages); pages left out stay out; without glue, the plain top-k."""
    starts = torch.tensor([False, True, True, False])  # vocabulary: 0 ' ', 1 '6', 2 'x' continue a word
    ends = torch.tensor([False, True, True, True])
    ids = torch.tensor([3, 0, 3, 1,  1, 1, 0, 3,  3, 3, 0, 2,  2, 0, 3, 3])  # pages of 4
    glued = glued_pages(ids, 4, 4, starts, ends)
    assert glued.tolist() == [True, False, True, False]
    score = torch.tensor([0.1, 0.9, 0.5, 0.4])
    none = torch.zeros(4, dtype=torch.bool)
    assert choose_pages(score, 2, none).tolist() == [1, 2]
    assert choose_pages(score, 2, none, glued).tolist() == [0, 1]  # page 1's number starts in page 0
    assert choose_pages(score, 4, none, glued).tolist() == [0, 1, 2, 3]
    skip = torch.tensor([True, False, False, False])
    assert choose_pages(score, 2, skip, glued).tolist() == [1, 2]  # a skipped page is never brought along
    unknown = ids.clone()
    unknown[3] = -1
    assert not bool(glued_pages(unknown, 4, 4, starts, ends)[0])


def test_the_scheduler_ends_each_choices_turn_before_its_caller_sees_the_end(tiny_ckpt):
    """Through the BatchScheduler, a +recall request's round lends pages for its reply only: when
    the stream ends, neither the request's slot nor its forked choice's holds a pin or a Lent record."""
    from lessserve.workers.scheduler import BatchScheduler, SamplingParams

    eng = engine(tiny_ckpt, "h2o+recall")
    slot, fork = eng.alloc(), eng.alloc()
    turns(eng, slot, n_turns=4, seed=1)
    before = eng.histories.get(slot).recalled
    with BatchScheduler(eng) as sched:
        out = list(sched.stream(slot, [5, 6, 7, 8, 9], SamplingParams(max_new_tokens=4, forks=(fork,))))
    assert len(out) == 8 and eng.histories.get(slot).recalled > before
    for s in (slot, fork):
        assert eng.histories.get(s).lent is None
        assert not bool((eng.slab.score[:, s] >= PIN_SCORE).any())
        check_slot_against_history(eng, s)


def test_a_reread_from_an_upper_layer_leaves_the_layers_below_as_the_step_wrote_them(tiny_ckpt):
    """recall_layer 1 (of the tiny model's 2): the round's re-read starts from the hidden states
    the step gave layer 1, so layer 0's entries for the re-read tokens are the step's own (a fork without
    the round holds the same), and so are layer 1's (its input is the step's), but layer 1 attends with
    the pages back, so the reply's first logits differ from the fork's; a layer the model does not have
    is refused."""
    eng = engine(tiny_ckpt, recall_reread=3, recall_layer=1)
    a = eng.alloc()
    turns(eng, a, n_turns=4, seed=2, reply=0)
    fork = eng.alloc()
    eng.slab.copy(a, fork)
    last = torch.tensor([[3, 4, 5]])
    with_round, without = eng.forward([a], last, recall=True), eng.forward([fork], last)
    assert not torch.allclose(with_round[:, -1], without[:, -1], rtol=1e-4, atol=1e-4)
    n = int(eng.slab.length[a])
    assert torch.equal(eng.slab.k[:, a, :, n - 3 : n], eng.slab.k[:, fork, :, n - 3 : n])
    assert torch.equal(eng.slab.v[:, a, :, n - 3 : n], eng.slab.v[:, fork, :, n - 3 : n])
    check_slot_against_history(eng, a)
    with pytest.raises(ConfigError, match="recall_layer 2"):
        engine(tiny_ckpt, recall_layer=2)


def test_a_turn_the_reread_covers_runs_in_one_pass_with_the_round_inside_its_step(tiny_ckpt, monkeypatch):
    """recall_layer 1: a last piece no longer than the re-read (and only its last logits wanted) runs the
    model once, the round before layer 1 (chosen by layer 0's queries); its reply logits see the pages
    (unlike a fork's without the round); a longer piece runs the step, then the re-read from layer 1."""
    eng = engine(tiny_ckpt, recall_reread=4, recall_layer=1)
    a = eng.alloc()
    turns(eng, a, n_turns=4, seed=6, reply=0)
    fork = eng.alloc()
    eng.slab.copy(a, fork)
    calls = []
    model = eng.model
    monkeypatch.setattr(eng, "model", lambda *args, **kw: calls.append(kw.get("start", 0)) or model(*args, **kw))
    before = eng.histories.get(a).recalled
    got = eng.forward([a], torch.tensor([[3, 4, 5]]), last_only=True, recall=True)
    assert calls == [0] and eng.histories.get(a).recalled > before
    plain = eng.forward([fork], torch.tensor([[3, 4, 5]]), last_only=True)
    assert not torch.allclose(got, plain, rtol=1e-4, atol=1e-4)
    check_slot_against_history(eng, a)
    eng.end_turn([a])
    calls.clear()
    eng.forward([a], torch.tensor([[6, 7, 8, 9, 10, 11]]), last_only=True, recall=True)
    assert calls == [0, 1]  # the piece's step, then the re-read of its last 4 tokens from layer 1
    check_slot_against_history(eng, a)


@pytest.mark.parametrize("base", ["h2o+less", "lambda+less", "h2o"])
def test_with_its_pages_returned_a_recall_turn_differs_from_its_base_policy_in_the_reply_only(tiny_ckpt, base):
    """Text read as turns, each turn's end returning its pages: every prediction equals the base
    policy's but each turn's last one (the reply's first token, which is what the pages are for),
    and that one does differ once something was evicted; the slot after each turn is the base's."""
    a, b = engine(tiny_ckpt, base), engine(tiny_ckpt, base + "+recall", recall_reread=3)
    sa, sb = a.alloc(), b.alloc()
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(4))
    changed = 0
    for start in range(0, 80, 10):  # turns of 10 tokens, fed as the scheduler does (chunks, the last with the round)
        turn = ids[:, start : start + 10]
        la = torch.cat([a.forward([sa], turn[:, o : o + n]) for o, n in a.chunks(a.slab.seen[sa], 10)], dim=1)
        lb = torch.cat([b.forward([sb], turn[:, o : o + n], recall=o + n == 10)
                        for o, n in b.chunks(b.slab.seen[sb], 10)], dim=1)
        b.end_turn([sb])
        torch.testing.assert_close(lb[:, :-1], la[:, :-1], rtol=1e-5, atol=1e-5)
        changed += not torch.allclose(lb[:, -1], la[:, -1], rtol=1e-5, atol=1e-5)
        assert torch.equal(a.slab.pos[:, sa], b.slab.pos[:, sb])
        torch.testing.assert_close(a.slab.k[:, sa], b.slab.k[:, sb], rtol=1e-5, atol=1e-5)
    assert changed > 0 and b.histories.get(sb).recalled > 0
