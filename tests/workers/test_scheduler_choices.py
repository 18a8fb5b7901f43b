"""What a request may ask of the scheduler beyond tokens: n choices forked from one prefill, each
token's logprobs, the prompt's logprobs, and a grammar; checked against independent references."""

import json

import pytest
import torch

from lessserve.workers.sampling import PromptLogprobs, Sampled
from lessserve.workers.scheduler import BatchScheduler, SamplingParams
from tests.workers.replay import feed


def run(sched, slot, ids, params):
    items = list(sched.stream(slot, ids, params))
    by_choice: dict[int, list[Sampled]] = {}
    for s in items:
        if isinstance(s, Sampled):
            by_choice.setdefault(s.index, []).append(s)
    prompt = [s for s in items if isinstance(s, PromptLogprobs)]
    return by_choice, prompt


def test_forked_choices_equal_separate_requests_with_their_seeds(tiny_engine_factory):
    """Choice i of one request (prefilled once, slot forked) samples exactly what a request of its
    own with seed + i samples: the fork is the prompt's state, the generators are independent."""
    eng = tiny_engine_factory()
    ids = list(range(3, 40))
    p = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, stop_ids=())
    with BatchScheduler(eng) as sched:
        slot, forks = sched.call(eng.alloc), [sched.call(eng.alloc) for _ in range(2)]
        got, _ = run(sched, slot, ids, SamplingParams(seed=7, forks=tuple(forks), **p))
        alone = []
        for i in range(3):
            s = sched.call(eng.alloc)
            alone.append([x.token for x in sched.stream(s, ids, SamplingParams(seed=7 + i, **p))])
            sched.call(lambda s=s: eng.free(s))
    assert [[x.token for x in got[i]] for i in range(3)] == alone
    assert len({tuple(a) for a in alone}) > 1  # the seeds do differ


def test_a_choice_stopped_by_its_caller_ends_alone(tiny_engine_factory):
    import asyncio
    import time

    eng = tiny_engine_factory()
    with BatchScheduler(eng) as sched:
        slot, fork = sched.call(eng.alloc), sched.call(eng.alloc)
        sched.on_step = lambda *a: time.sleep(0.02)  # steps slower than the consumer: it keeps up
        stopped: set[int] = set()
        counts = {0: 0, 1: 0}

        async def main():
            params = SamplingParams(max_new_tokens=30, stop_ids=(), forks=(fork,))
            async for s in sched.generate(slot, [3, 4, 5], params, stopped=stopped):
                counts[s.index] += 1
                if s.index == 1 and counts[1] == 3:
                    stopped.add(1)

        asyncio.run(main())
    assert counts[0] == 30 and 3 <= counts[1] <= 5  # choice 0 went on; choice 1 ended within a step or two


def test_logprobs_are_the_models_log_softmax(tiny_engine_factory):
    eng, ref = tiny_engine_factory(), tiny_engine_factory()
    ids = list(range(5, 30))
    with BatchScheduler(eng) as sched:
        slot = sched.call(eng.alloc)
        got, _ = run(sched, slot, ids, SamplingParams(max_new_tokens=6, stop_ids=(), logprobs=3))
    rslot = ref.alloc()
    logits = feed(ref, rslot, ids)
    for s in got[0]:
        lp = torch.log_softmax(logits.float(), -1)
        assert s.token == int(lp.argmax())  # greedy
        assert s.logprob == pytest.approx(float(lp[s.token]), abs=1e-5)
        top = lp.topk(3)
        assert [t for t, _ in s.top] == top.indices.tolist()
        assert [v for _, v in s.top] == pytest.approx(top.values.tolist(), abs=1e-5)
        logits = ref.decode([rslot], [s.token])[0]


def test_prompt_logprobs_sum_to_the_window_nll(tiny_engine_factory):
    """max_new_tokens 0 with prompt logprobs: the prefill's own predictions, which is what `eval ppl`
    sums (evals/ppl.window_nll), under the same policy and chunking."""
    from lessserve.evals.ppl import window_nll

    ids = [int(x) for x in torch.randint(3, 60, (70,), generator=torch.Generator().manual_seed(1))]
    for policy in ("full", "h2o"):
        eng = tiny_engine_factory(policy=policy)
        with BatchScheduler(eng) as sched:
            slot = sched.call(eng.alloc)
            got, prompt = run(sched, slot, ids, SamplingParams(max_new_tokens=0, prompt_logprobs=1))
        assert got == {} and len(prompt) == 1
        lps = prompt[0].logprobs
        assert len(lps) == len(ids) and lps[0] is None and all(len(t) == 1 for t in prompt[0].top[1:])
        nll, n = window_nll(tiny_engine_factory(policy=policy), ids)
        assert n == len(ids) - 1 and -sum(lps[1:]) == pytest.approx(nll, rel=1e-5)


def test_json_schema_output_parses_and_validates_for_every_seed(default_engine):
    """The 135M default model, sampled at temperature 1 under a schema: valid JSON every time."""
    from lessserve.workers.chat_session import encode, render
    from lessserve.workers.constraints import json_schema_grammar

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    grammar = json_schema_grammar(schema)
    eng = default_engine(max_slots=4)
    tok = eng.tokenizer
    ids = encode(tok, render(tok, [{"role": "user", "content": "Describe a person as JSON."}]))
    with BatchScheduler(eng) as sched:
        slot, forks = sched.call(eng.alloc), tuple(sched.call(eng.alloc) for _ in range(3))
        outs = []
        for seed in range(0, 20, 4):  # 5 requests x 4 choices: seeds 0-19, each once (choice i uses seed + i)
            c = eng.grammars.constraint(grammar)
            got, _ = run(sched, slot, ids, SamplingParams(max_new_tokens=60, temperature=1.0, seed=seed,
                                                          stop_ids=eng.stop_ids, constraint=c, forks=forks))
            outs += [tok.decode([s.token for s in got[i] if s.token not in eng.stop_ids]) for i in range(4)]
            sched.call(lambda: [eng.slab.reset(s) for s in (slot, *forks)])
    for text in outs:
        obj = json.loads(text)
        assert set(obj) == {"name", "age"} and isinstance(obj["age"], int) and 0 <= obj["age"] <= 120
        assert isinstance(obj["name"], str) and len(obj["name"]) <= 12
    assert len(outs) == 20 and len(set(outs)) > 1


def test_a_grammar_error_fails_only_its_request(tiny_engine_factory):
    from lessserve.workers.constraints import GrammarError

    eng = tiny_engine_factory()

    class Broken:
        def mask_(self, logits):
            raise GrammarError("constrained decoding failed: broken")

        def fork(self):
            return self

    with BatchScheduler(eng) as sched:
        a, b = sched.call(eng.alloc), sched.call(eng.alloc)
        other = sched.stream(b, [3, 4, 5], SamplingParams(max_new_tokens=20, stop_ids=()))
        first = next(other)
        with pytest.raises(GrammarError):
            list(sched.stream(a, [6, 7], SamplingParams(max_new_tokens=5, constraint=Broken())))
        assert len([first, *other]) == 20
