"""LESS weights are bound to their model and budget: the manifest records the model's fingerprint, a
mismatch is a clear error, and no budget falls back to another budget's weights unless a file is
given explicitly or a shipped manifest declares the budget among those it serves (then the engine
says which budget it was trained at)."""

from __future__ import annotations

import json
import shutil

import pytest

from lessserve.cli.main import main
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.errors import ConfigError, LessWeightsMissingError
from lessserve.workers.less_weights import SHIPPED_DIR, LessWeights, model_fingerprint, shipped_weights_path
from lessserve.workers.model_loader import load_checkpoint

MODEL = "smollm2-135m-instruct"
SHIPPED = SHIPPED_DIR / f"{MODEL}-h2o-b128.safetensors"


def test_the_shipped_weights_are_bound_to_the_default_model():
    ckpt = load_checkpoint(MODEL)
    bound = LessWeights.load(SHIPPED).manifest["model_fingerprint"]
    assert bound == model_fingerprint(ckpt.args, ckpt.folder)
    assert shipped_weights_path(MODEL, "h2o", 128) == SHIPPED


def test_another_budget_finds_no_weights_and_says_what_is_shipped():
    with pytest.raises(LessWeightsMissingError, match="shipped for budget 60-768 only.*--less-weights"):
        shipped_weights_path(MODEL, "h2o", 32)  # the shipped manifest serves 60-768 (validated on dev)
    assert shipped_weights_path(MODEL, "h2o", 422) == SHIPPED
    with pytest.raises(LessWeightsMissingError, match="shipped for budget 128 only"):
        shipped_weights_path(MODEL, "lambda", 64)  # lambda's declares no other budget


def test_the_cli_refuses_a_budget_without_weights_in_one_line(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["generate", "--prompt", "hi", "--policy", "h2o+less", "--budget", "1024"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1 and "--policy" in err[0] and "budget 60-768 only" in err[0]


def test_weights_given_explicitly_at_another_budget_run_and_say_so(default_model):
    ckpt, first = default_model
    e = Engine(EngineConfig(policy="h2o+less", budget=64, max_slots=1, less_weights=str(SHIPPED)),
               checkpoint=ckpt, tokenizer=first.tokenizer, model=first.model)
    assert e.less_note == "LESS weights trained at budget 128, serving budget 64"
    same = Engine(EngineConfig(policy="h2o+less", budget=128, max_slots=1), checkpoint=ckpt,
                  tokenizer=first.tokenizer, model=first.model)
    assert same.less_note is None


def test_weights_of_another_model_are_refused(default_model, tmp_path):
    ckpt, first = default_model
    other = tmp_path / "other.safetensors"
    shutil.copy(SHIPPED, other)
    manifest = json.loads(SHIPPED.with_suffix(".json").read_text())
    other.with_suffix(".json").write_text(json.dumps({**manifest, "model_fingerprint": "0123456789abcdef"}))
    with pytest.raises(ConfigError, match="fingerprint 0123456789abcdef.*do not fit"):
        Engine(EngineConfig(policy="h2o+less", budget=128, max_slots=1, less_weights=str(other)),
               checkpoint=ckpt, tokenizer=first.tokenizer, model=first.model)


def test_the_fingerprint_reads_the_model_not_how_its_files_were_written(tmp_path, tiny_ckpt):
    ckpt = load_checkpoint(MODEL)
    base = model_fingerprint(ckpt.args, ckpt.folder)
    tok = json.loads((ckpt.folder / "tokenizer.json").read_text())
    merges = tok["model"]["merges"]
    other_spelling = [m.split(" ", 1) if isinstance(m, str) else " ".join(m) for m in merges]
    (tmp_path / "tokenizer.json").write_text(json.dumps({**tok, "model": {**tok["model"], "merges": other_spelling}},
                                                        indent=1))
    assert model_fingerprint(ckpt.args, tmp_path) == base  # merges as "a b" or ["a", "b"], any indentation
    assert model_fingerprint(tiny_ckpt.args, tmp_path) != base  # another decoder shape
    vocab = dict(tok["model"]["vocab"])
    vocab["zzz-new-token"] = len(vocab)
    (tmp_path / "tokenizer.json").write_text(json.dumps({**tok, "model": {**tok["model"], "vocab": vocab}}))
    assert model_fingerprint(ckpt.args, tmp_path) != base  # another vocabulary


def test_a_manifest_declaring_budgets_serves_them_and_no_others(tmp_path, monkeypatch):
    """serves_budgets [lo, hi] (validated on dev) extends a shipped file to those budgets, said in the
    engine's note; outside them the error names the span; the exact budget's own file comes first."""
    from lessserve.workers import less_weights as lw

    for suffix in (".safetensors", ".json"):
        shutil.copy(SHIPPED.with_suffix(suffix), tmp_path / f"{MODEL}-h2o-b128{suffix}")
    man = tmp_path / f"{MODEL}-h2o-b128.json"
    man.write_text(json.dumps({**json.loads(man.read_text()), "serves_budgets": [128, 768]}))
    monkeypatch.setattr(lw, "SHIPPED_DIR", tmp_path)
    assert lw.shipped_weights_path(MODEL, "h2o", 422) == tmp_path / f"{MODEL}-h2o-b128.safetensors"
    with pytest.raises(LessWeightsMissingError, match="shipped for budget 128-768 only"):
        lw.shipped_weights_path(MODEL, "h2o", 1024)
    with pytest.raises(LessWeightsMissingError, match="shipped for budget 128-768 only"):
        lw.shipped_weights_path(MODEL, "h2o", 64)
    ckpt = load_checkpoint(MODEL)
    engine = Engine(EngineConfig(policy="h2o+less", budget=422, kv_bits="8", max_slots=1, device="cpu",
                                 dtype="float32"), checkpoint=ckpt)
    assert engine.less_note == "LESS weights trained at budget 128, serving budget 422"
