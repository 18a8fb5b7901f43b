"""`lessserve train-less --device D` end to end on a tiny random Llama: the streaming per-layer stage,
then the end-to-end stage from its weights (`--init` of a streaming export), and the weights run in an
engine on the same device. The cuda case is marked gpu and skipped cleanly without a CUDA GPU (CI);
the prepared GPU script runs the gpu marker."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_checkpoint
from tests.training.test_stream import BUDGET, CHUNK, T, _cli_data

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_both_stages_train_on_the_device_and_serve_there(tmp_path, monkeypatch, capsys, one_torch_thread, device):
    from lessserve.cli.main import main
    from lessserve.training import run
    from lessserve.workers.config import EngineConfig
    from lessserve.workers.engine import Engine

    ckpt = tiny_checkpoint(tmp_path)
    monkeypatch.setattr(run, "load_checkpoint", lambda name: ckpt)
    monkeypatch.setattr(run, "load_tokenizer", lambda folder: lambda text, add_special_tokens=False: {
        "input_ids": [ord(c) % 128 for c in text]})
    data = _cli_data(tmp_path)
    common = ["--data", *data, "--seq-len", str(T), "--budget", str(BUDGET), "--chunk", str(CHUNK), "--rank", "4",
              "--hidden", "16", "--dev-seqs", "1", "--device", device]
    assert main(["train-less", *common, "--policies", "h2o,lambda", "--stream-tokens", str(T * 4),
                 "--stream-eval-every", "2", "--stream-warmup", "1", "--out", str(tmp_path / "s.safetensors"),
                 "--work-dir", str(tmp_path / "work")]) == 0
    stage1 = tmp_path / "s-h2o.safetensors"
    assert json.loads(stage1.with_suffix(".json").read_text())["tokens"]["per_layer"] == T * 4
    assert main(["train-less", *common, "--policy", "h2o", "--init", str(stage1), "--finetune-steps", "2",
                 "--finetune-seqs", "4", "--finetune-eval-every", "1", "--out", str(tmp_path / "e.safetensors"),
                 "--work-dir", str(tmp_path / "work2")]) == 0
    man = json.loads((tmp_path / "e.json").read_text())
    assert [h["step"] for h in man["finetune"]["history"]] == [0, 1, 2]
    capsys.readouterr()
    cfg = EngineConfig(policy="h2o+less", budget=BUDGET, max_slots=1, device=device, dtype="float32",
                       prefill_chunk=CHUNK, less_weights=str(tmp_path / "e.safetensors"))
    engine = Engine(cfg, checkpoint=ckpt)
    slot = engine.alloc()
    logits = engine.prefill(slot, list(range(3, 3 + 3 * BUDGET)), all_logits=True)
    assert logits.device.type == device and torch.isfinite(logits).all()


def test_dev_learning_curve_counts_every_stage_of_the_weights(tmp_path):
    """dev_eval --curve: tokens seen in all (an --init stage's record folded in), one point per text and
    the mean score, and a PNG."""
    from lessserve.training.dev_eval import main, tokens_seen

    assert tokens_seen({"tokens": {"init": {"per_layer": 100, "end_to_end": 5}, "end_to_end": 7}}) == {
        "per_layer": 100, "end_to_end": 12}
    assert tokens_seen({"tokens": {"per_layer": 300}}) == {"per_layer": 300} and tokens_seen({}) == {}
    rows = [{"weights": f"/x/h2o-t{n}.safetensors", "tokens": {"per_layer": n}, "policy": "h2o", "score": g,
             "texts": {"a": {"gap_closed": g - 0.1}, "b": {"gap_closed": g + 0.1}}}
            for n, g in ((100, 0.2), (300, 0.3))]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert main(["--curve", str(tmp_path / "rows.json"), "--json", str(tmp_path / "c.json"),
                 "--plot", str(tmp_path / "c.png")]) == 0
    pts = json.loads((tmp_path / "c.json").read_text())
    assert [(p["text"], p["tokens"], round(p["gap_closed"], 6)) for p in pts] == [
        ("a", 100, 0.1), ("a", 300, 0.2), ("b", 100, 0.3), ("b", 300, 0.4),
        ("score (mean)", 100, 0.2), ("score (mean)", 300, 0.3)]
    assert all(p["weights"].startswith("h2o-t") for p in pts)  # names, not machine paths
    assert (tmp_path / "c.png").stat().st_size > 1000
