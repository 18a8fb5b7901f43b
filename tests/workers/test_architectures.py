"""The parity matrix: per served family, a tiny random checkpoint saved by transformers itself.

Our logits equal transformers' (fp32 and bf16, each within its tolerance) over a sequence longer
than the original context, so the RoPE scaling is exercised; greedy tokens equal transformers'
cached generate; and every compression policy at a budget covering the sequence equals `full`.
Refused families are refused with one line naming the feature.
"""

from __future__ import annotations

import json

import pytest
import torch

from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.errors import UnsupportedModelError
from lessserve.workers.model import LlamaModel, causal_attend
from lessserve.workers.model_loader import ModelArgs, load_checkpoint, transformers_model
from tests.conftest import tiny_less
from tests.workers.replay import scheduled

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 500000.0}
L = 96  # tokens per parity sequence: past every original context below (32 / 64)

# family -> (transformers config class, its fields): one row per checkpoint kind people serve
FAMILIES = {
    "llama2": ("LlamaConfig", dict(max_position_embeddings=128)),
    "llama2-bias": ("LlamaConfig", dict(max_position_embeddings=128, attention_bias=True, mlp_bias=True)),
    "llama2-linear": ("LlamaConfig", dict(max_position_embeddings=64, rope_scaling={"rope_type": "linear",
                                                                                    "factor": 2.0})),
    "llama2-dynamic": ("LlamaConfig", dict(max_position_embeddings=64, rope_scaling={"rope_type": "dynamic",
                                                                                     "factor": 2.0})),
    "llama3.1": ("LlamaConfig", dict(max_position_embeddings=128, rope_parameters=LLAMA3)),
    "llama3.1-old-key": ("LlamaConfig", dict(max_position_embeddings=128, rope_scaling={
        **{k: v for k, v in LLAMA3.items() if k != "rope_theta"}, "type": "llama3"}, rope_theta=500000.0)),
    "llama3.2-tied": ("LlamaConfig", dict(max_position_embeddings=128, rope_parameters=LLAMA3,
                                          tie_word_embeddings=True, head_dim=32)),
    "llama-yarn": ("LlamaConfig", dict(max_position_embeddings=128, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen2.5-tied": ("Qwen2Config", dict(max_position_embeddings=128, tie_word_embeddings=True)),
    "qwen2.5-yarn": ("Qwen2Config", dict(max_position_embeddings=128, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", dict(max_position_embeddings=128, head_dim=32, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(max_position_embeddings=128, sliding_window=128, head_dim=16)),
}
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}  # absolute, on logits of magnitude ~5 (measured: 0.0 for all)
POLICIES = ["full", "h2o", "lambda", "h2o+less", "lambda+less", "h2o+", "lambda+"]


def save_family(folder, family: str, seed: int = 0):
    import transformers

    cls, fields = FAMILIES[family]
    cfg = getattr(transformers, cls)(**SHAPE, **fields, architectures=[cls.replace("Config", "ForCausalLM")])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # visible weights: norms away from 1, biases away from 0
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = save_family(tmp_path_factory.mktemp(family.replace(".", "_")), family)
        return cache[family]

    return get


def ids(n, seed=0):
    return torch.randint(0, SHAPE["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(saved, family, dtype):
    folder = saved(family)
    ckpt = load_checkpoint(str(folder))
    ours = LlamaModel(ckpt.args)
    ours.load_hf_state_dict(ckpt.state_dict)
    ours = ours.to(dtype).eval()
    hf = transformers_model(folder, dtype=dtype).eval()
    toks = torch.tensor([ids(L, seed=1)])
    with torch.no_grad():
        a = ours(toks, torch.arange(L)[None], causal_attend)
        b = hf(toks).logits.float()
    diff = (a - b).abs().max().item()
    print(f"{family} {dtype}: max |logit diff| {diff:.3g} (logits up to {b.abs().max().item():.3g})")
    assert diff < TOL[dtype], diff


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_equal_transformers_generate(saved, family):
    folder = saved(family)
    e = Engine(EngineConfig(model=str(folder), policy="full", max_context=4096, prefill_chunk=16, max_slots=1,
                            device="cpu", dtype="float32"))
    prompt = ids(24, seed=2)
    n_new = L - 24  # decoding crosses the original context
    got = scheduled(e, prompt, n_new)
    hf = transformers_model(folder).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 24:].tolist()
    assert got == ref


@pytest.mark.parametrize("family", ["llama3.1", "llama2-dynamic", "qwen2.5-yarn", "qwen3", "mistral"])
def test_every_policy_covering_the_sequence_equals_full(saved, family):
    folder = saved(family)
    ckpt = load_checkpoint(str(folder))
    toks = ids(L, seed=3)
    out, shared = {}, None
    for policy in POLICIES:
        less = tiny_less(ckpt.args) if policy.endswith("+less") else None
        e = Engine(EngineConfig(model=str(folder), policy=policy, budget=L, prefill_chunk=16, max_context=4096,
                                max_slots=1, device="cpu", dtype="float32"), checkpoint=ckpt, less=less, model=shared)
        shared = e.model
        out[policy] = e.prefill(e.alloc(), toks, all_logits=True)
    for policy in POLICIES[1:]:
        assert torch.allclose(out[policy], out["full"], atol=1e-5), (policy, (out[policy] - out["full"]).abs().max())


# --- refused, with one line --------------------------------------------------------------------
def hf_config(cls: str, **fields) -> dict:
    import transformers

    cfg = getattr(transformers, cls)(**SHAPE, **fields)
    d = json.loads(cfg.to_json_string())
    d["architectures"] = [cls.replace("Config", "ForCausalLM")]
    return d


@pytest.mark.parametrize("cls, fields, says", [
    ("Gemma2Config", {}, "soft-capping"),
    ("Gemma3TextConfig", {}, "Gemma 3"),
    ("Phi3Config", {}, "fused qkv_proj"),
    ("LlamaConfig", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                      "original_max_position_embeddings": 32}}, "longrope"),
    ("LlamaConfig", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("LlamaConfig", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_features_are_refused_in_one_line(cls, fields, says):
    cfg = hf_config(cls, **fields)
    if cls == "Gemma3TextConfig":
        cfg["architectures"] = ["Gemma3ForCausalLM"]
    with pytest.raises(UnsupportedModelError) as err:
        ModelArgs.from_hf_config(cfg)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_quantized_checkpoint_is_refused():
    cfg = hf_config("LlamaConfig")
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    with pytest.raises(UnsupportedModelError, match="quantized"):
        ModelArgs.from_hf_config(cfg)


def test_sliding_window_caps_the_context():
    """Mistral / Qwen sliding windows: exact below the window, so a session is capped at it."""
    assert ModelArgs.from_hf_config(hf_config("MistralConfig", max_position_embeddings=4096,
                                              sliding_window=512)).context_len == 512
    assert ModelArgs.from_hf_config(hf_config("MistralConfig", max_position_embeddings=4096,
                                              sliding_window=None)).context_len == 4096
    qwen = hf_config("Qwen2Config", max_position_embeddings=4096, sliding_window=256, use_sliding_window=True,
                     max_window_layers=1)
    assert ModelArgs.from_hf_config(qwen).sliding_window == 256
    qwen_off = hf_config("Qwen2Config", max_position_embeddings=4096, sliding_window=256, use_sliding_window=False)
    assert ModelArgs.from_hf_config(qwen_off).context_len == 4096


def test_rope_context_lengths():
    """vLLM's derivation: llama3 states its length, linear / dynamic / yarn stretch the original."""
    def ctx(family):
        cls, fields = FAMILIES[family]
        return ModelArgs.from_hf_config(hf_config(cls, **fields)).context_len
    assert ctx("llama3.1") == 128 and ctx("llama2-linear") == 128 and ctx("llama2-dynamic") == 128
    assert ctx("llama-yarn") == 128 and ctx("mistral") == 128
