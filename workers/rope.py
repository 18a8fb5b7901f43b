"""Rotary position embeddings: one factory for every RoPE type a served checkpoint may ask for.

`Rope.from_hf_config(cfg)` reads both config spellings (transformers 5's `rope_parameters`, the
older `rope_scaling` + top-level `rope_theta`) and refuses what it cannot compute exactly
(UnsupportedModelError, one line). `Rope.cos_sin(positions, dtype)` gives the HF 'rotate_half'
tables. Types: default, linear, dynamic (NTK), llama3, yarn; each matches
transformers.modeling_rope_utils to float32 rounding.

dynamic: transformers recomputes the base for a forward whose furthest position passes
max_position_embeddings; here each row (session) of a step uses its own furthest position, so a
batch gives every session its solo result. Keys already cached keep the rotation they were
written with, as in transformers with a KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lessserve.workers.errors import UnsupportedModelError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_REFUSED = {"longrope": "longrope/su RoPE scaling (per-dimension long/short factors switched by length)",
            "su": "longrope/su RoPE scaling (per-dimension long/short factors switched by length)",
            "mrope": "multimodal mrope RoPE", "proportional": "proportional RoPE"}


def rope_parameters(cfg: dict) -> dict:
    """The one RoPE dict of an HF config, whichever spelling it uses (`rope_type` always set)."""
    new = cfg.get("rope_parameters") or {}
    if new and all(isinstance(v, dict) for v in new.values()):
        raise UnsupportedModelError(f"per-layer-type RoPE parameters ({sorted(new)}) are not supported")
    p = {**(cfg.get("rope_scaling") or {}), **new}
    p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
    p.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return p


@dataclass(frozen=True)
class Rope:
    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    max_position_embeddings: int = 4096  # the config's (dynamic's reference length)
    original_max_position_embeddings: int | None = None  # llama3, yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn (None: from factor / mscale)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn

    @classmethod
    def from_hf_config(cls, cfg: dict, head_dim: int) -> Rope:
        p = rope_parameters(cfg)
        t = p["rope_type"]
        if t in _REFUSED:
            raise UnsupportedModelError(f"rope_type {t!r} is not supported: {_REFUSED[t]}")
        if t not in ROPE_TYPES:
            raise UnsupportedModelError(f"rope_type {t!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        prf = p.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if prf not in (None, 1, 1.0):
            raise UnsupportedModelError(f"partial_rotary_factor {prf} is not supported (RoPE over the whole head)")
        mpe = int(cfg.get("max_position_embeddings", 4096))
        omax = p.get("original_max_position_embeddings")
        need = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("original_max_position_embeddings",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        missing = [k for k in need.get(t, ()) if p.get(k) is None]
        if missing:
            raise UnsupportedModelError(f"rope_type {t!r} needs {', '.join(missing)} in the config")
        factor = p.get("factor")
        if t == "yarn" and factor is None:
            factor = mpe / omax
        return cls(head_dim=head_dim, theta=float(p["rope_theta"]), rope_type=t,
                   factor=float(factor if factor is not None else 1.0), max_position_embeddings=mpe,
                   original_max_position_embeddings=int(omax) if omax is not None else None,
                   low_freq_factor=float(p.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(p.get("high_freq_factor", 4.0)),
                   beta_fast=float(p.get("beta_fast") or 32), beta_slow=float(p.get("beta_slow") or 1),
                   attention_factor=p.get("attention_factor"), mscale=p.get("mscale"),
                   mscale_all_dim=p.get("mscale_all_dim"), truncate=bool(p.get("truncate", True)))

    @property
    def context_len(self) -> int:
        """The longest sequence the scaled RoPE was made for (vLLM's derivation): llama3 configs
        already state it; linear / dynamic / yarn stretch the original length by `factor`."""
        if self.rope_type in ("default", "llama3"):
            return self.max_position_embeddings
        base = self.original_max_position_embeddings or self.max_position_embeddings
        return int(base * self.factor)

    # --- the tables ---------------------------------------------------------------------------
    def _base_inv_freq(self, base: float | torch.Tensor = None) -> torch.Tensor:
        d = self.head_dim
        exps = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d
        return 1.0 / ((self.theta if base is None else base) ** exps)

    def inv_freq(self) -> tuple[torch.Tensor, float]:
        """(inv_freq [D/2] fp32 on the CPU, attention scaling of cos/sin) at the config's length."""
        t, d = self.rope_type, self.head_dim
        inv = self._base_inv_freq()
        if t in ("default", "dynamic"):
            return inv, 1.0
        if t == "linear":
            return inv / self.factor, 1.0
        if t == "llama3":
            old = self.original_max_position_embeddings
            low_wl, high_wl = old / self.low_freq_factor, old / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wl, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
            return torch.where(medium, smoothed, scaled), 1.0
        # yarn
        factor = self.factor

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        att = self.attention_factor
        if att is None:
            att = (get_mscale(factor, self.mscale) / get_mscale(factor, self.mscale_all_dim)
                   if self.mscale and self.mscale_all_dim else get_mscale(factor))

        omax = self.original_max_position_embeddings

        def corr_dim(rot):
            return (d * math.log(omax / (rot * 2 * math.pi))) / (2 * math.log(self.theta))

        low, high = corr_dim(self.beta_fast), corr_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        pos_freqs = self.theta ** (torch.arange(0, d, 2, device="cpu").float() / d)
        extra = 1 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
        return inv, float(att)

    def cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
        """positions [n, C], inv_freq [D/2] (from inv_freq(), on the device) -> cos, sin [n, 1, C, D]."""
        inv = inv_freq[None, None, :]  # [1, 1, D/2]
        if self.rope_type == "dynamic":  # each row's furthest position sets its base
            mpe = self.max_position_embeddings
            seq = (positions.amax(-1, keepdim=True) + 1).clamp_min(mpe)  # [n, 1]
            d = self.head_dim
            base = self.theta * ((self.factor * seq / mpe) - (self.factor - 1)) ** (d / (d - 2))
            exps = torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d
            scaled = 1.0 / (base[..., None] ** exps)  # [n, 1, D/2]
            inv = torch.where(seq[..., None] > mpe, scaled, inv)
        ang = positions.float()[..., None] * inv  # [n, C, D/2]
        ang = torch.cat([ang, ang], dim=-1)[:, None]
        cos, sin = ang.cos(), ang.sin()
        if scaling != 1.0:
            cos, sin = cos * scaling, sin * scaling
        return cos.to(dtype), sin.to(dtype)
