"""End-to-end LESS fine-tuning: its parallel forward must be the engine's chunked prefill, exactly."""

import pytest
import torch

from lessserve.training.e2e import FinetuneConfig, compressed_logits, finetune, kl_to_full
from lessserve.workers.model import causal_attend
from tests.conftest import tiny_less
from tests.workers.test_policies import ids, make


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
    assert summary["val_best"]["score"] > summary["val_before"]["score"]
    assert summary["val_best"]["step"] > 0
    # Interrupted after the first eval (3 steps), then resumed: same result as one run.
    state = tmp_path / "ft.pt"
    finetune(e.model, kern, data[:3], data[3:], e.spec, 8, FinetuneConfig(steps=6, lr=3e-2, eval_every=3),
             state_path=state, log=lambda m: None, stop_after=3)
    again, s2 = finetune(e.model, kern, data[:3], data[3:], e.spec, 8, cfg, state_path=state, log=lambda m: None)
    assert [h["step"] for h in s2["history"]] == [0, 3, 6]
    for a, b in zip(out.layers, again.layers, strict=True):
        assert torch.allclose(a.w1q, b.w1q, atol=1e-6)


@pytest.mark.parametrize("argv, flag", [
    (["--init", "nope.safetensors", "--finetune-steps", "2"], "--init"),
    (["--finetune-steps", "-1"], "--finetune-steps"),
    (["--finetune-steps", "2", "--finetune-lr", "3"], "--finetune-lr"),
    (["--finetune-steps", "2", "--finetune-seqs", "1"], "--finetune-seqs"),
])
def test_finetune_flags_are_checked(tmp_path, capsys, argv, flag):
    from lessserve.cli.main import main

    data = tmp_path / "d.txt"
    data.write_text("some text " * 50)
    with pytest.raises(SystemExit) as ex:
        main(["train-less", "--data", str(data), "--out", str(tmp_path / "k.safetensors"), *argv])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err


def test_init_needs_finetune_steps(tmp_path, capsys):
    from lessserve.cli.main import main

    data, init = tmp_path / "d.txt", tmp_path / "k.safetensors"
    data.write_text("some text " * 50)
    tiny_less().save(init)
    with pytest.raises(SystemExit) as ex:
        main(["train-less", "--data", str(data), "--init", str(init)])
    assert ex.value.code == 2 and "--finetune-steps" in capsys.readouterr().err


def test_run_finetune_records_the_run_in_the_manifest(tiny_ckpt, tmp_path):
    from lessserve.training.e2e import run_finetune

    e = make(tiny_ckpt, "h2o+less", budget=16, chunk=8)
    data = torch.tensor([ids(64, seed=20 + i) for i in range(10)])
    cfg = FinetuneConfig(steps=2, lr=1e-2, eval_every=1)
    out = run_finetune(e.model, tiny_less(tiny_ckpt.args), data[:8], data[8:], ["a", "b"], e.spec, 8, cfg, tmp_path,
                       "lessserve train-kernels x")
    ft = out.manifest["finetune"]
    assert ft["command"] == "lessserve train-kernels x" and ft["train_seqs"] == 8 and ft["val_seqs"] == 2
    assert [h["step"] for h in ft["history"]] == [0, 1, 2] and ft["tokens"] == 2 * 64
    assert set(ft["history"][0]["texts"]) == {"a", "b"} and ft["val_texts"] == ["a", "b"]
    assert len(list(tmp_path.glob("finetune-*.pt"))) == 1  # resumable state
    assert out.digest() != tiny_less(tiny_ckpt.args).digest()


def test_recorded_command_carries_no_machine_paths(tmp_path, monkeypatch):
    from lessserve.cli.train import recorded_command

    data = tmp_path / "shared" / "brown.txt"
    data.parent.mkdir()
    data.write_text("x")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    cmd = recorded_command(["train-kernels", "--data", str(data), "--work-dir", "/tmp/w", "--out=/tmp/k.safetensors",
                            "--threads", "2", "--resume", "--finetune-steps", "5"])
    assert cmd == "lessserve train-kernels --data ../shared/brown.txt --finetune-steps 5"
