"""Our Llama implementation matches transformers' own on the same checkpoint (full cache)."""

import pytest
import torch

from lessserve.workers.model import LlamaModel, causal_attend

TOL = 1e-4  # fp32, absolute, on logits of magnitude ~30


@pytest.fixture(scope="module")
def models(default_ckpt):
    from lessserve.workers.model_loader import transformers_model

    ours = LlamaModel(default_ckpt.args)
    ours.load_hf_state_dict(default_ckpt.state_dict)
    hf = transformers_model(default_ckpt.folder)
    return ours.eval(), hf.eval()


@pytest.mark.parametrize("length", [1, 13, 97, 300])
def test_logits_match_transformers(models, length):
    ours, hf = models
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(0, ours.args.vocab_size, (1, length), generator=g)
    with torch.no_grad():
        a = ours(ids, torch.arange(length)[None], causal_attend)
        b = hf(ids).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL


def test_engine_full_policy_matches_transformers(models, default_engine_factory):
    _, hf = models
    eng = default_engine_factory(policy="full", prefill_chunk=16)
    ids = torch.randint(0, 1000, (77,), generator=torch.Generator().manual_seed(3)).tolist()
    slot = eng.alloc()
    got = eng.prefill(slot, ids, all_logits=True)
    eng.free(slot)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (got - ref).abs().max().item() < 1e-3
