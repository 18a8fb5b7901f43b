"""The streaming per-layer stage on a tiny random Llama: the window stream, its in-memory
preparation against the existing functions, resume == uninterrupted (bit for bit), training beats
sparse-only on dev, config mismatch refused, exports run in the engine, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from lessserve.kernels.reference.evict import EvictionSpec
from lessserve.training.capture import capture_qkv, eviction_chunks
from lessserve.training.config import StreamConfig
from lessserve.training.data import Corpus
from lessserve.training.layer import prepare_layer
from lessserve.training.stream import CHECKPOINT, LOG, StreamMismatchError, export, load_state, train_stream
from lessserve.training.stream_data import WindowStream
from lessserve.training.stream_prep import capture_layers, sparse_batch
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.less_weights import LessWeights
from lessserve.workers.model import LlamaModel
from tests.conftest import tiny_checkpoint

BUDGET, CHUNK, T = 16, 8, 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_of(ckpt) -> LlamaModel:
    m = LlamaModel(ckpt.args)
    m.load_hf_state_dict(ckpt.state_dict)
    return m.eval()


def corpus(part: str, seed: int, lengths: list[int]) -> Corpus:
    g = torch.Generator().manual_seed(seed)
    names = [f"text{i}" for i in range(len(lengths))]
    return Corpus(part, names, [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths],
                  {n: str(i) for i, n in enumerate(names)})


TRAIN, DEV = corpus("train", 0, [T * 9 + 5, T * 3, T * 6 + 20]), corpus("dev", 1, [T * 2, T, T + 7])


def cfg(**kw) -> StreamConfig:
    base = dict(model="tiny", policies=["h2o", "lambda"], budget=BUDGET, rank=4, hidden=16, chunk=CHUNK, seq_len=T,
                tokens=T * 24, lr=1e-2, warmup=2, query_chunks=3, dropout=0.3, eval_every=3, checkpoint_every=4,
                dev_seqs=1, dev_query_chunks=0)
    return StreamConfig(**{**base, **kw})


def test_stream_is_deterministic_interleaved_and_addressable():
    s = WindowStream(TRAIN, T, seed=3)
    n0 = s.pass_length(0)
    assert n0 == 9 + 3 + 6
    wins = [s.window(i) for i in range(n0 + 5)]
    first = wins[:n0]
    for name, ids, n in zip(TRAIN.names, TRAIN.ids, (9, 3, 6), strict=True):  # pass 0 = the plain cut, each once
        starts = sorted(w.start for w in first if w.text == name)
        assert starts == [j * T for j in range(n)]
        for w in first:
            if w.text == name:
                assert w.tokens.tolist() == ids[w.start:w.start + T]
    texts = [w.text for w in first]
    assert len(set(texts[:3])) == 3 and len(set(texts[3:6])) == 3 and len(set(texts[6:9])) == 3  # turns
    assert set(texts[9:]) <= {"text0", "text2"} and "text1" not in texts[9:]  # a file that ran out left
    assert all(w.pass_ == 0 for w in first) and all(w.pass_ == 1 for w in wins[n0:])
    again = WindowStream(TRAIN, T, seed=3)
    for i in (n0 + 4, 2, n0 - 1, 0):  # any cursor, any order: the same window
        assert torch.equal(again.window(i).tokens, wins[i].tokens) and again.window(i).text == wins[i].text
    other = WindowStream(TRAIN, T, seed=4)
    assert [other.window(i).start for i in range(n0)] != [w.start for w in first]


def test_capture_and_sparse_batch_equal_the_existing_functions(tmp_path):
    m = model_of(tiny_checkpoint(tmp_path))
    tok = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(5))
    ours, theirs = capture_layers(m, tok), capture_qkv(m, tok)
    for layer in (0, 1):
        for f in "qkv":
            assert torch.equal(ours[layer][f], theirs[layer][f])
    for spec in (EvictionSpec("h2o", BUDGET, BUDGET // 2), EvictionSpec("lambda", BUDGET, BUDGET - 4, 4)):
        for chunks in (torch.tensor([2, 5, 7]), torch.arange(2, T // CHUNK)):
            c = ours[1]
            e = eviction_chunks(c["q"], c["k"], c["v"], spec, CHUNK)
            want = prepare_layer(c["q"], c["k"], c["v"], e, CHUNK, start=BUDGET, chunks=chunks)
            got = sparse_batch(c, e, CHUNK, chunks)
            assert torch.equal(got.q_chunk, want.q_chunk) and torch.equal(got.q, want.q)
            for f in ("o_sparse", "lse", "o_full"):
                assert torch.allclose(getattr(got, f), getattr(want, f), atol=1e-5), (spec.mode, f)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run of 24 windows (both policies), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("straight")
    ckpt = tiny_checkpoint(tmp)
    out = train_stream(model_of(ckpt), TRAIN, DEV, cfg(), tmp / "run")
    return ckpt, tmp / "run", out


def _tensors(obj, prefix=""):
    """Every tensor in a nested state, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def test_resumed_run_equals_uninterrupted_run(straight, tmp_path):
    ckpt, run_a, out_a = straight
    run_b = tmp_path / "run"
    train_stream(model_of(ckpt), TRAIN, DEV, cfg(), run_b, stop_after=8)  # interrupted at the checkpoint of window 8
    assert load_state(run_b / CHECKPOINT)["cursor"] == 8
    with (run_b / LOG).open("a") as f:  # a record written after that checkpoint is forgotten on resume
        f.write(json.dumps({"window": 9}) + "\n")
    out_b = train_stream(model_of(ckpt), TRAIN, DEV, cfg(), run_b, resume=True)
    a, b = load_state(run_a / CHECKPOINT), load_state(run_b / CHECKPOINT)
    ta, tb = dict(_tensors({k: a[k] for k in ("weights", "opt", "best")})), dict(_tensors({k: b[k] for k in
                                                                                          ("weights", "opt", "best")}))
    assert ta.keys() == tb.keys() and len(ta) > 50
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    for p in ("h2o", "lambda"):
        for wa, wb in zip(out_a[p].layers, out_b[p].layers, strict=True):
            assert all(torch.equal(getattr(wa, f), getattr(wb, f)) for f in vars(wa))
    assert [r["window"] for r in map(json.loads, (run_b / LOG).read_text().splitlines())] == \
        [0, 3, 6, 9, 12, 15, 18, 21, 24]


def test_training_lowers_dev_loss_below_sparse_only(straight):
    _, run, out = straight
    for p in ("h2o", "lambda"):
        for s in out[p].manifest["layers"]:
            assert s["val_loss"] < 0.95 * s["sparse_val_loss"], (p, s)
            assert s["best_window"] > 0
    log = list(map(json.loads, (run / LOG).read_text().splitlines()))
    assert log[-1]["dev"]["h2o"]["mean"] < log[0]["dev"]["h2o"]["mean"]
    assert set(log[-1]["throughput"]["tokens_per_s"]) == {"capture", "evict", "prepare", "train", "overall"}
    assert log[0]["sparse"]["lambda"]["layers"] and log[-1]["tokens"] == 24 * T


def test_resume_refuses_another_config(straight, tmp_path):
    ckpt, run, _ = straight
    with pytest.raises(StreamMismatchError, match="--lr"):
        train_stream(model_of(ckpt), TRAIN, DEV, cfg(lr=2e-2), run, resume=True)
    with pytest.raises(StreamMismatchError, match="--stream-tokens"):
        train_stream(model_of(ckpt), TRAIN, DEV, cfg(tokens=T * 30), run, resume=True)


@pytest.mark.parametrize("policy", ["h2o", "lambda"])
def test_exported_weights_load_and_run_in_the_engine(straight, tmp_path, policy):
    ckpt, run, _ = straight
    path = tmp_path / f"{policy}.safetensors"
    export(run / CHECKPOINT, policy, path)
    w = LessWeights.load(path)
    m = w.manifest
    assert m["stage"] == "per-layer-stream" and m["policy"] == policy and m["tokens"]["per_layer"] == 24 * T
    assert m["budget"] == BUDGET and m["throughput"]["tokens_per_s"]["overall"] > 0 and len(m["layers"]) == 2
    eng = Engine(EngineConfig(model="tiny", policy=f"{policy}+less", budget=BUDGET, prefill_chunk=CHUNK,
                              max_slots=1), checkpoint=ckpt, less=w)
    s = eng.alloc()
    logits = eng.prefill(s, torch.randint(0, 128, (T,), generator=torch.Generator().manual_seed(9)).tolist())
    assert torch.isfinite(logits).all() and float(eng.slab.z[:, s].abs().sum()) > 0


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    c = cfg(tokens=T * 100, warmup=10, lr_floor=0.1)
    lrs = [c.lr_at(w) for w in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(lrs[9:-1], lrs[10:], strict=True)) and lrs[-1] == pytest.approx(1e-3, rel=0.01)


def _cli_data(tmp_path) -> list[str]:
    paths = []
    for i in range(2):
        p = tmp_path / f"text{i}.txt"
        p.write_text("".join(f"line {j} of text {i}: " + "abcdefgh"[j % 8] * (j % 13) + "\n" for j in range(300)))
        paths.append(str(p))
    return paths


def test_cli_trains_both_policies_resumes_and_checks_flags(tmp_path, monkeypatch, capsys):
    from lessserve.cli.main import main
    from lessserve.training import run

    ckpt = tiny_checkpoint(tmp_path)
    monkeypatch.setattr(run, "load_checkpoint", lambda name: ckpt)
    monkeypatch.setattr(run, "load_tokenizer", lambda folder: lambda text, add_special_tokens=False: {
        "input_ids": [ord(c) % 128 for c in text]})
    data = _cli_data(tmp_path)
    argv = ["train-less", "--data", *data, "--stream-tokens", str(T * 6), "--seq-len", str(T), "--budget", str(BUDGET),
            "--chunk", str(CHUNK), "--rank", "4", "--hidden", "16", "--policies", "h2o,lambda", "--dev-seqs", "1",
            "--stream-eval-every", "2", "--stream-warmup", "1", "--stream-export-every", "3",
            "--out", str(tmp_path / "w.safetensors"), "--work-dir", str(tmp_path / "work")]
    assert main(argv) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "w-h2o.safetensors"), str(tmp_path / "w-lambda.safetensors")]
    man = json.loads((tmp_path / "w-lambda.json").read_text())
    assert man["stage"] == "per-layer-stream" and man["tokens"]["per_layer"] == T * 6 and "--work-dir" not in \
        man["command"] and man["model_fingerprint"]
    exports = tmp_path / "work" / "stream-h2o+lambda-b16" / "exports"
    assert sorted(p.name for p in exports.glob("*.safetensors")) == [
        f"{p}-t{w * T}.safetensors" for p in ("h2o", "lambda") for w in (3, 6)]
    with pytest.raises(SystemExit) as ex:
        main([*argv, "--resume", "--lr", "0.02"])
    assert ex.value.code == 2 and "--lr" in capsys.readouterr().err
    for bad, flag in ((["--policies", "h2o,foo"], "--policies"), (["--stream-tokens", "10"], "--stream-tokens"),
                      (["--stream-warmup", "6"], "--stream-warmup"), (["--finetune-steps", "3"], "--finetune-steps")):
        with pytest.raises(SystemExit) as ex:
            main([*argv, *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert ex.value.code == 2 and len(err) == 1 and flag in err[0], (bad, err)
    with pytest.raises(SystemExit) as ex:
        main(["train-less", "--data", *data, "--policies", "h2o,lambda"])
    assert ex.value.code == 2 and "--policies" in capsys.readouterr().err
