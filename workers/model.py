"""The one decoder (Llama 1-3.x, SmolLM, Mistral, Qwen2/2.5, Qwen3) that owns its attention call.

Per-family differences are ModelArgs fields (biases, Qwen3's q/k norms, tied embeddings, the RoPE
type from workers/rope.py), never subclasses. The model is cache-agnostic: each layer hands
post-RoPE q, k, v to an `attend` callback (the engine's compressed session cache, or plain causal
attention for a full-cache pass). Module names follow HF's so a checkpoint's state dict loads as is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lessserve.workers.errors import ModelNotFoundError, UnsupportedModelError
from lessserve.workers.model_loader import ModelArgs, read_safetensors

# attend(layer, q [n, Hq, C, D], k [n, Hkv, C, D], v [n, Hkv, C, D]) -> out [n, Hq, C, D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.attention_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.attention_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.attention_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [n, C, hidden] -> post-RoPE q [n, Hq, C, D], k [n, Hkv, C, D], v [n, Hkv, C, D]."""
        n, C, _ = x.shape
        a = self.a
        q = self.q_proj(x).view(n, C, a.num_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(n, C, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, C, a.num_kv_heads, a.head_dim).transpose(1, 2)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)


class Decoder(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class LlamaModel(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.model = Decoder(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.rope = a.rotary
        inv, self.rope_scaling = self.rope.inv_freq()  # computed on the CPU, also under a meta-device init
        self.register_buffer("inv_freq", inv, persistent=False)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` casts float buffers: inv_freq follows the device only and stays fp32."""
        inv = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv.to(self.inv_freq.device, torch.float32)
        return self

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = {k: v for k, v in state.items() if "rotary_emb" not in k}
        if "lm_head.weight" not in state:
            if not self.args.tie_word_embeddings:
                raise ModelNotFoundError("the checkpoint has no lm_head.weight and tie_word_embeddings is false")
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        self.load_state_dict(state, strict=True)

    @classmethod
    def from_checkpoint(cls, ckpt, device: torch.device, dtype: torch.dtype) -> LlamaModel:
        """The model of a LoadedCheckpoint on `device` in `dtype`, without a random-init pass: built on
        the meta device, each stored tensor read from its file straight into its parameter (on the CPU
        in the stored dtype: no copy at all), so host memory peaks at about one model, not two."""
        if ckpt.in_memory:
            model = cls(ckpt.args)
            model.load_hf_state_dict(ckpt.state_dict)
            return model.to(device=device, dtype=dtype).eval()
        with torch.device("meta"):
            model = cls(ckpt.args)
        wanted = dict(model.named_parameters())
        loaded: set[str] = set()
        for f in ckpt.files:
            for name, stored, shape, read in read_safetensors(f):
                if "rotary_emb" in name:
                    continue
                if name not in wanted:
                    raise UnsupportedModelError(f"{ckpt.model_id}: weight {name!r} has no place in {ckpt.args.arch} "
                                                "as configured (a feature of the checkpoint this model lacks)")
                if shape != tuple(wanted[name].shape):
                    raise UnsupportedModelError(f"{ckpt.model_id}: weight {name} is {list(shape)}, the config "
                                                f"implies {list(wanted[name].shape)}")
                if device.type == "cpu" and stored == dtype:
                    t = read(torch.empty(shape, dtype=dtype))
                else:  # one tensor's host buffer at a time
                    t = read(torch.empty(shape, dtype=stored)).to(device=device, dtype=dtype)
                model.set_weight(name, t)
                loaded.add(name)
        if "lm_head.weight" not in loaded:
            if not ckpt.args.tie_word_embeddings:
                raise ModelNotFoundError("the checkpoint has no lm_head.weight and tie_word_embeddings is false")
            model.set_weight("lm_head.weight", model.model.embed_tokens.weight)
            loaded.add("lm_head.weight")
        missing = sorted(set(wanted) - loaded)
        if missing:
            raise ModelNotFoundError(f"{ckpt.model_id}: weights missing from the checkpoint: {missing[:4]}")
        model.inv_freq = model.inv_freq.to(device)
        return model.eval()

    def set_weight(self, name: str, t: torch.Tensor) -> None:
        mod, _, leaf = name.rpartition(".")
        setattr(self.get_submodule(mod), leaf, nn.Parameter(t, requires_grad=False))

    def forward(
        self,
        tokens: torch.Tensor,  # [n, C]
        positions: torch.Tensor,  # [n, C] absolute positions
        attend: AttendFn,
        last_only: bool = False,
        head: bool = True,
        start: int = 0,
        x: torch.Tensor | None = None,
        taps: dict[int, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Returns logits [n, C, V] (or [n, 1, V] with last_only; [n, 0, V] without the head: a
        `+recall` step whose tokens the round reads again skips the vocabulary projection).
        `start`, `x` [n, C, hidden]: run from layer `start`, x the hidden states entering it (a re-read
        of the upper layers). `taps`: for each layer key, the hidden states entering it are stored."""
        if x is None:
            x = self.model.embed_tokens(tokens)
        cos, sin = self.rope.cos_sin(positions, self.inv_freq, self.rope_scaling, x.dtype)
        for i, blk in enumerate(self.model.layers[start:], start=start):
            if taps is not None and i in taps:
                taps[i] = x
            q, k, v = blk.self_attn.qkv(blk.input_layernorm(x), cos, sin)
            o = attend(i, q, k, v)  # [n, Hq, C, D]
            n, _, C, _ = o.shape
            x = x + blk.self_attn.o_proj(o.transpose(1, 2).reshape(n, C, -1))
            x = x + blk.mlp(blk.post_attention_layernorm(x))
        if not head:
            return x.new_empty(x.shape[0], 0, self.lm_head.out_features, dtype=torch.float32)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()


def causal_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full causal attention over the given tokens only (no cache): the uncompressed baseline."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
