"""Loading as stored: the safetensors index and its shards (stray files ignored), the stored dtype,
no random-init pass, and peak host memory while loading a ~200 MB checkpoint (a child process's
VmHWM high-water mark: tracemalloc does not see torch's allocations)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from lessserve.workers.config import EngineConfig
from lessserve.workers.engine import Engine
from lessserve.workers.model import LlamaModel, causal_attend
from lessserve.workers.model_loader import load_checkpoint

HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
             "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
             "max_position_embeddings": 2048}


def save_sharded(folder, shards: int, dtype=torch.bfloat16, seed=0, **shape) -> int:
    """A random Llama checkpoint in `shards` files with an index, plus a stray consolidated.safetensors
    that must be ignored. Returns the weights' bytes."""
    cfg = {**HF_CONFIG, **shape}
    from lessserve.workers.model_loader import ModelArgs

    args = ModelArgs.from_hf_config(cfg)
    with torch.device("meta"):
        names = {k: v.shape for k, v in LlamaModel(args).named_parameters()}
    if args.tie_word_embeddings:
        names.pop("lm_head.weight")
    g = torch.Generator().manual_seed(seed)
    keys = sorted(names)
    groups = [keys[i::shards] for i in range(shards)]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {k: (torch.randn(names[k], generator=g) * 0.05).to(dtype) for k in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(folder / fname))
        weight_map.update(dict.fromkeys(group, fname))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    (folder / "consolidated.safetensors").write_bytes(b"not the transformers checkpoint")
    (folder / "config.json").write_text(json.dumps({**cfg, "torch_dtype": str(dtype).split(".")[1]}))
    return total


SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)


def test_index_shards_and_stored_dtype(tmp_path):
    save_sharded(tmp_path, shards=3, **SMALL)
    ckpt = load_checkpoint(str(tmp_path))
    assert [f.name for f in ckpt.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert ckpt.stored_dtype == torch.bfloat16
    streamed = LlamaModel.from_checkpoint(ckpt, torch.device("cpu"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in streamed.parameters())
    eager = LlamaModel(ckpt.args)
    eager.load_hf_state_dict(ckpt.state_dict)  # the old path: every tensor in memory, then copied
    for (n, a), (_, b) in zip(streamed.state_dict().items(), eager.to(torch.bfloat16).state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n
    toks = torch.arange(20)[None] % 128
    with torch.no_grad():
        assert torch.equal(streamed(toks, torch.arange(20)[None], causal_attend),
                           eager(toks, torch.arange(20)[None], causal_attend))
    e = Engine(EngineConfig(model=str(tmp_path), policy="full", max_slots=1, device="cpu", dtype="bfloat16"))
    assert e.model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_weights_the_config_implies_but_the_files_lack_are_an_error(tmp_path):
    from lessserve.workers.errors import ConfigError

    save_sharded(tmp_path, shards=1, **SMALL)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["mlp_bias"] = True  # the config asks for biases the file does not have
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing"):
        LlamaModel.from_checkpoint(load_checkpoint(str(tmp_path)), torch.device("cpu"), torch.bfloat16)


CHILD = textwrap.dedent("""
    import sys, torch
    from lessserve.workers.model import LlamaModel
    from lessserve.workers.model_loader import load_checkpoint

    def hwm():  # this process's peak RSS (ru_maxrss would carry the parent's across exec)
        return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM"))

    ckpt = load_checkpoint(sys.argv[1])
    with torch.device("meta"):  # torch's one-time cost of a meta-device build (its meta kernels): not the load's
        LlamaModel(ckpt.args)
    before = hwm()
    model = LlamaModel.from_checkpoint(ckpt, torch.device("cpu"), torch.bfloat16)
    after = hwm()
    n = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    print(before, after, n)
""")


@pytest.mark.slow
def test_peak_host_memory_loading_200mb_checkpoint(tmp_path):
    size = save_sharded(tmp_path, shards=2, vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                        num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True)
    assert 180e6 < size < 260e6
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, check=True,
                         timeout=300)
    before, after, n = map(int, out.stdout.split()[-3:])
    assert n == size
    grew = after - before
    print(f"checkpoint {size / 1e6:.1f} MB (bf16), peak RSS grew {grew / 1e6:.1f} MB = {grew / size:.3f}x")
    assert grew <= 1.3 * size
