"""LESS training on a tiny random Llama: masks match the engine, training beats sparse-only,
resume, manifest, CLI errors, and the saved kernels run in the engine."""

from __future__ import annotations

import json

import pytest
import torch

from lessserve.kernels.reference.evict import EvictionSpec
from lessserve.training.capture import capture_qkv, eviction_chunks
from lessserve.training.layer import less_output, prepare_layer
from lessserve.training.layerwise import TrainConfig, run_training
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.less_weights import LessWeights
from lessserve.workers.model import LlamaModel
from tests.conftest import tiny_checkpoint, tiny_less

BUDGET, CHUNK, T = 16, 8, 64


def model_of(ckpt) -> LlamaModel:
    m = LlamaModel(ckpt.args)
    m.load_hf_state_dict(ckpt.state_dict)
    return m.eval()


def seqs(n=6, seed=0):
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


def cfg(**kw):
    base = dict(model="tiny", policy="h2o", budget=BUDGET, rank=4, hidden=16, epochs=6, chunk=CHUNK, lr=1e-2,
                batch=2, dropout=0.0, data_sha256="x")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("policy", ["h2o", "lambda"])
def test_training_output_equals_engine_less_output_on_layer0(tmp_path, policy):
    ckpt = tiny_checkpoint(tmp_path)
    less = tiny_less(ckpt.args)
    eng = Engine(EngineConfig(model="tiny", policy=f"{policy}+less", budget=BUDGET, prefill_chunk=CHUNK,
                              max_slots=1), checkpoint=ckpt, less=less)
    toks = seqs(1)
    got = []
    inner = eng.model.forward

    def spy(tokens, positions, attend, last_only=False, **kw):
        def wrapped(layer, q, k, v):
            out = attend(layer, q, k, v)
            if layer == 0:
                got.append(out)
            return out
        return inner(tokens, positions, wrapped, last_only, **kw)

    eng.model.forward = spy
    eng.prefill(eng.alloc(), toks[0].tolist())
    engine_out = torch.cat(got, dim=2)  # [1, Hq, T, D]
    qkv = capture_qkv(model_of(ckpt), toks)[0]
    e = eviction_chunks(qkv["q"], qkv["k"], qkv["v"], eng.spec, CHUNK)
    b = prepare_layer(qkv["q"], qkv["k"], qkv["v"], e, CHUNK, start=0)
    ours = less_output(b, less.layers[0])
    assert int((e < e.max()).sum()) > 0
    assert torch.allclose(ours, engine_out, atol=1e-4), (ours - engine_out).abs().max()


def test_eviction_record_keeps_budget_per_chunk():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, T, 16, generator=g), torch.randn(2, 2, T, 16, generator=g), torch.randn(2, 2, T, 16)
    e = eviction_chunks(q, k, v, EvictionSpec("h2o", BUDGET, BUDGET // 2), CHUNK)
    for c in range(T // CHUNK):
        kept = ((e > c) & (torch.arange(T) < (c + 1) * CHUNK)).sum(-1)  # held after chunk c
        assert int(kept.max()) <= BUDGET


def test_training_beats_sparse_only_and_resumes(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    work = tmp_path / "work"
    k1 = run_training(model_of(ckpt), seqs(), cfg(), work)
    for s in k1.manifest["layers"]:
        assert s["val_loss"] < s["sparse_val_loss"]
    for f in ("command", "data_sha256", "model", "policy", "budget", "rank", "hidden", "epochs", "layers"):
        assert f in k1.manifest
    run_dir = work / cfg().run_name()
    (run_dir / "layer1.pt").unlink()  # an interrupted run: layer 0 done, layer 1 not
    mtime = (run_dir / "layer0.pt").stat().st_mtime_ns
    k2 = run_training(model_of(ckpt), seqs(), cfg(), work, resume=True)
    assert (run_dir / "layer0.pt").stat().st_mtime_ns == mtime
    for a, b in zip(k1.layers, k2.layers, strict=True):
        assert torch.equal(a.w1q, b.w1q) and torch.equal(a.w2k, b.w2k)  # seeded: resumed == uninterrupted


def test_saved_kernels_load_and_run_in_engine(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    kern = run_training(model_of(ckpt), seqs(4), cfg(epochs=1), tmp_path / "w")
    path = tmp_path / "k.safetensors"
    kern.save(path)
    assert json.loads(path.with_suffix(".json").read_text())["policy"] == "h2o"
    eng = Engine(EngineConfig(model="tiny", policy="h2o+less", budget=BUDGET, prefill_chunk=CHUNK, max_slots=1),
                 checkpoint=ckpt, less=LessWeights.load(path))
    s = eng.alloc()
    logits = eng.prefill(s, seqs(1)[0].tolist())
    assert torch.isfinite(logits).all() and float(eng.slab.z[:, s].abs().sum()) > 0


@pytest.mark.parametrize("data", ["missing", "empty"])
def test_bad_data_exits_2_naming_the_flag(tmp_path, capsys, data):
    from lessserve.cli.main import main

    path = tmp_path / "nothing.txt"
    if data == "empty":
        path.write_text("   \n")
    with pytest.raises(SystemExit) as ex:
        main(["train-less", "--data", str(path), "--out", str(tmp_path / "k.safetensors")])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0]


def test_compressed_capture_matches_full_where_nothing_differs(tmp_path):
    from lessserve.training.capture import capture_qkv_compressed

    m = model_of(tiny_checkpoint(tmp_path))
    toks = seqs(2)
    full = capture_qkv(m, toks)
    roomy = capture_qkv_compressed(m, toks, EvictionSpec("h2o", T, T // 2), CHUNK)  # budget holds everything
    tight = capture_qkv_compressed(m, toks, EvictionSpec("h2o", BUDGET, BUDGET // 2), CHUNK)
    for f in ("q", "k", "v"):
        assert torch.allclose(roomy[1][f], full[1][f], atol=1e-4)
        assert torch.allclose(tight[0][f], full[0][f], atol=1e-5)  # layer 0 sees the same input
    assert not torch.allclose(tight[1]["q"], full[1]["q"], atol=1e-4)
