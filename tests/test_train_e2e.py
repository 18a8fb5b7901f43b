"""End-to-end LESS fine-tuning: its parallel forward must be the engine's chunked prefill, exactly."""

import pytest
import torch

from lessserve.workers.model import causal_attend
from lessserve.workers.train_e2e import FinetuneConfig, compressed_logits, finetune, kl_to_full
from tests.conftest import tiny_less
from tests.engine.test_policies import ids, make


@pytest.mark.parametrize("policy", ["h2o", "lambda", "h2o+less", "lambda+less"])
def test_parallel_form_equals_engine_chunked_prefill(tiny_ckpt, policy):
    e = make(tiny_ckpt, policy, budget=16, chunk=8)
    toks = ids(64, seed=3)
    s = e.alloc()
    want = e.prefill(s, toks, all_logits=True)  # [T, V]
    layers = e.less.layers if e.less is not None else None
    with torch.no_grad():
        got = compressed_logits(e.model, torch.tensor([toks]), e.spec, 8, layers)[0]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    full = e.model(torch.tensor([toks]), torch.arange(64)[None], causal_attend)[0]
    assert (got - full).abs().max() > 1e-2  # evictions really happened


def test_gradient_checkpointing_gives_the_same_gradients(tiny_ckpt):
    e = make(tiny_ckpt, "h2o+less", budget=16, chunk=8)
    tok = torch.tensor([ids(48, seed=4)])
    with torch.no_grad():
        full = torch.log_softmax(e.model(tok, torch.arange(48)[None], causal_attend), -1)
    grads = []
    for ckpt in (True, False):
        ws = [type(w)(**{k: v.clone().requires_grad_(True) for k, v in vars(w).items()}) for w in e.less.layers]
        kl_to_full(compressed_logits(e.model, tok, e.spec, 8, ws, grad_checkpoint=ckpt), full, 16).backward()
        grads.append(torch.cat([v.grad.flatten() for w in ws for v in vars(w).values()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_finetune_lowers_validation_kl_and_resumes(tiny_ckpt, tmp_path):
    e = make(tiny_ckpt, "h2o+less", budget=16, chunk=8)
    kern = tiny_less(tiny_ckpt.args, scale_init=1e-2)
    data = torch.tensor([ids(64, seed=10 + i) for i in range(4)])
    cfg = FinetuneConfig(steps=6, lr=3e-2, eval_every=3, seed=0)
    out, summary = finetune(e.model, kern, data[:3], data[3:], e.spec, 8, cfg, log=lambda m: None)
    assert summary["val_best"]["kl"] < summary["val_before"]["kl"]
    assert summary["val_best"]["step"] > 0
    # Interrupted after the first eval (3 steps), then resumed: same result as one run.
    state = tmp_path / "ft.pt"
    finetune(e.model, kern, data[:3], data[3:], e.spec, 8, FinetuneConfig(steps=6, lr=3e-2, eval_every=3),
             state_path=state, log=lambda m: None, stop_after=3)
    again, s2 = finetune(e.model, kern, data[:3], data[3:], e.spec, 8, cfg, state_path=state, log=lambda m: None)
    assert [h["step"] for h in s2["history"]] == [0, 3, 6]
    for a, b in zip(out.layers, again.layers, strict=True):
        assert torch.allclose(a.w1q, b.w1q, atol=1e-6)
