"""What a serving user sets about the model: --dtype, --max-model-len, --served-model-name,
--chat-template, --less-weights; eos ids from generation_config.json; one-line refusals at `serve`."""

from __future__ import annotations

import json

import pytest
import torch

from lessserve.cli.main import build_parser, main
from lessserve.cli.serve import config_from_args
from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.errors import ConfigError, ContextOverflowError
from tests.workers.replay import scheduled
from tests.workers.test_architectures import hf_config, save_family


def test_serve_flags_reach_the_config(tmp_path):
    less = tmp_path / "w.safetensors"
    less.write_bytes(b"")
    args = build_parser().parse_args(["serve", "--dtype", "bfloat16", "--max-model-len", "4096",
                                      "--served-model-name", "my-llama", "--chat-template", "{{ messages }}",
                                      "--less-weights", str(less)])
    cfg = config_from_args(args)
    assert (cfg.engine.dtype, cfg.engine.max_model_len, cfg.model_name) == ("bfloat16", 4096, "my-llama")
    assert cfg.engine.chat_template == "{{ messages }}" and cfg.engine.less_weights == str(less)


def test_max_model_len_flag_names_itself_on_a_bad_value(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--max-model-len", "3"])
    assert e.value.code == 2
    assert "--max-model-len" in capsys.readouterr().err


@pytest.mark.parametrize("cls, says", [("Gemma2Config", "soft-capping"), ("Phi3Config", "fused qkv_proj")])
def test_unsupported_model_is_one_line_at_serve_before_ray_starts(tmp_path, monkeypatch, capsys, cls, says):
    from lessserve.cluster import launch

    monkeypatch.setattr(launch, "start", lambda *a, **k: pytest.fail("serve started Ray for a refused model"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cls)))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and says in err and "--model" in err and len(err.splitlines()) == 1


def test_max_model_len_past_the_context_is_refused_at_serve(tmp_path, monkeypatch, capsys):
    from lessserve.cluster import launch

    monkeypatch.setattr(launch, "start", lambda *a, **k: pytest.fail("serve started Ray"))
    save_family(tmp_path, "llama3.1")  # context 128
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(tmp_path), "--max-model-len", "129"])
    assert "context of 128 tokens" in capsys.readouterr().err


def make(folder, **kw):
    return Engine(EngineConfig(model=str(folder), policy="h2o", budget=16, prefill_chunk=16, max_slots=1,
                               device="cpu", dtype="float32", **kw))


def test_sessions_are_bounded_by_max_model_len(tmp_path):
    save_family(tmp_path, "mistral")  # sliding window 128: the context
    e = make(tmp_path)
    assert e.max_model_len == 128
    s = e.alloc()
    e.prefill(s, list(range(100)))
    with pytest.raises(ContextOverflowError, match="max_model_len=128"):
        e.prefill(s, list(range(29)))
    short = make(tmp_path, max_model_len=40)
    with pytest.raises(ContextOverflowError, match="max_model_len=40"):
        short.prefill(short.alloc(), list(range(41)))
    with pytest.raises(ConfigError, match="sliding_window 128"):
        make(tmp_path, max_model_len=129)


def test_eos_ids_of_generation_config_stop_generation(tmp_path):
    save_family(tmp_path, "llama3.1")
    e = make(tmp_path)
    prompt = list(range(10))
    free = scheduled(e, prompt, 8)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [free[5], 127]}))
    e2 = make(tmp_path)
    assert e2.stop_ids == (free[5], 127)
    got = scheduled(e2, prompt, 8, stop_ids=e2.stop_ids)
    assert got == free[:free.index(free[5]) + 1]


def test_chat_template_replaces_the_tokenizers(tmp_path, default_ckpt):
    from lessserve.workers.model_loader import load_tokenizer

    save_family(tmp_path, "qwen3")
    load_tokenizer(default_ckpt.folder).save_pretrained(tmp_path)
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    e = make(tmp_path, chat_template=str(tpl))
    msgs = [{"role": "user", "content": "hi"}]
    assert e.tokenizer.apply_chat_template(msgs, tokenize=False) == "<user>hi"
    with pytest.raises(ConfigError, match="chat_template"):
        make(tmp_path, chat_template=str(tmp_path / "missing.jinja"))
    assert torch.is_tensor(e.model.inv_freq)
