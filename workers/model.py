"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) that owns its attention call.

The model is cache-agnostic: each layer hands post-RoPE q, k, v to an `attend` callback
(the engine's compressed session cache, or plain causal attention for a full-cache pass).
Module names follow HF's so a checkpoint's state dict loads as is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lessserve.workers.model_loader import ModelArgs

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


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions: [n, C] -> cos, sin: [n, 1, C, D] (HF 'rotate_half' layout)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float()[..., None] * inv  # [n, C, D/2]
    ang = torch.cat([ang, ang], dim=-1)[:, None]
    return ang.cos().to(dtype), ang.sin().to(dtype)


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
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [n, C, hidden] -> post-RoPE q [n, Hq, C, D], k [n, Hkv, C, D], v [n, Hkv, C, D]."""
        n, C, _ = x.shape
        a = self.a
        q = self.q_proj(x).view(n, C, a.num_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(n, C, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, C, a.num_kv_heads, a.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

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

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        if "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        state = {k: v for k, v in state.items() if "rotary_emb" not in k}
        self.load_state_dict(state, strict=True)

    def forward(
        self,
        tokens: torch.Tensor,  # [n, C]
        positions: torch.Tensor,  # [n, C] absolute positions
        attend: AttendFn,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Returns logits [n, C, V] (or [n, 1, V] with last_only)."""
        a = self.args
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, a.head_dim, a.rope_theta, x.dtype)
        for i, blk in enumerate(self.model.layers):
            q, k, v = blk.self_attn.qkv(blk.input_layernorm(x), cos, sin)
            o = attend(i, q, k, v)  # [n, Hq, C, D]
            n, _, C, _ = o.shape
            x = x + blk.self_attn.o_proj(o.transpose(1, 2).reshape(n, C, -1))
            x = x + blk.mlp(blk.post_attention_layernorm(x))
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()


def causal_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full causal attention over the given tokens only (no cache): the uncompressed baseline."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
