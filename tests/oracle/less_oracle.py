"""An independent, deliberately naive implementation of LESS serving, written from ../shared/LESS.md
and the documented engine rules (docs/engine.md) alone: no lessserve code is imported here.

It keeps a session's whole history (every key and value ever computed) and expresses the
compressed cache the way the LESS reference code does: as a boolean mask over absolute positions,
per layer and KV head. Each query row of the full attention matrix is computed on its own, in
float64, over the positions its mask lets it see:

  visible(t)  = cached positions before the chunk  +  the chunk's positions <= t (causal)
  o(q)        = (sum_i e^{s_i-m} v_i + e^{-m} phi(q)^T H) / (sum_i e^{s_i-m} + e^{-m} phi(q)^T z)
                s_i = q.k_i / sqrt(D), m = max_i s_i over the visible positions
  mass_i     += e^{s_i-m} / sum_j e^{s_j-m}   (the sparse softmax, summed over the GQA group's
                                               query heads and the chunk's queries)

After each chunk (a decode step is a chunk of one), per layer and KV head, the chunk's positions
join the cache; while it holds more than `budget` positions the policy picks victims:
  h2o     the `recent` highest positions are kept, then the highest accumulated scores; the
          lowest score is evicted first (equal scores: the earliest position goes first)
  lambda  positions < `sink` and the `budget - sink` highest positions are kept
  full    nothing is evicted
and each victim i is folded into the state: H += psi(k_i)^T v_i, z += psi(k_i) (its score dropped).

The Llama forward (RMSNorm, rotate-half RoPE, GQA, SwiGLU) is rewritten here from the checkpoint's
HF state dict, also in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

F64 = torch.float64


@dataclass(frozen=True)
class OracleSpec:
    mode: str  # "full" | "h2o" | "lambda"
    budget: int
    recent: int = 0
    sink: int = 0


def documented_spec(policy: str, budget: int, rank: int, head_dim: int, cache_itemsize: int) -> OracleSpec:
    """docs/engine.md defaults: h2o recent = budget/2, lambda sink = 4; `+` adds the LESS state's
    bytes in tokens, R(D+1)*4 / (key + value + position + score), rounded up."""
    base = policy.split("+")[0]
    if base == "full":
        return OracleSpec("full", 10**9)
    b = budget
    if policy.endswith("+"):
        b += math.ceil(rank * (head_dim + 1) * 4 / (2 * head_dim * cache_itemsize + 8))
    if base == "h2o":
        return OracleSpec("h2o", b, recent=b // 2)
    return OracleSpec("lambda", b, recent=b - 4, sink=4)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def phi_map(q: torch.Tensor, w: dict) -> torch.Tensor:
    """q [D] of query head h -> phi(q) [R] = | gelu( gelu(q W1q) W2q ) |."""
    return gelu(gelu(q @ w["w1q"]) @ w["w2q"]).abs()


def psi_map(k: torch.Tensor, w: dict) -> torch.Tensor:
    """k [D] of KV head h -> psi(k) [R]: a = |s1| * gelu( gelu(k W1k) W2k ); | a + (a Wint) * s2 |."""
    a = w["s1"].abs() * gelu(gelu(k @ w["w1k"]) @ w["w2k"])
    return (a + (a @ w["wint"]) * w["s2"]).abs()


class NaiveLlama:
    def __init__(self, state: dict[str, torch.Tensor], num_heads: int, num_kv_heads: int, head_dim: int,
                 eps: float, theta: float):
        self.w = {k: v.detach().to(F64) for k, v in state.items()}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.Hq, self.Hkv, self.D, self.eps, self.theta = num_heads, num_kv_heads, head_dim, eps, theta
        self.L = sum(1 for k in self.w if k.endswith("self_attn.q_proj.weight"))

    def p(self, layer: int, name: str) -> torch.Tensor:
        return self.w[f"model.layers.{layer}.{name}.weight"]

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean() + self.eps) * w

    def rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x [D] at absolute position pos (pairs i, i + D/2 rotated by pos * theta^(-2i/D))."""
        half = self.D // 2
        out = torch.empty_like(x)
        for i in range(half):
            ang = pos * self.theta ** (-2.0 * i / self.D)
            c, s = math.cos(ang), math.sin(ang)
            out[i] = x[i] * c - x[i + half] * s
            out[i + half] = x[i + half] * c + x[i] * s
        return out


@dataclass
class HeadCache:
    """One layer and KV head: which positions are cached, their scores, the LESS state."""

    cached: list[int] = field(default_factory=list)  # ascending absolute positions
    score: dict[int, float] = field(default_factory=dict)
    H: torch.Tensor | None = None  # [R, D]
    z: torch.Tensor | None = None  # [R]
    evicted: list[int] = field(default_factory=list)  # every position ever folded into H, z
    min_margin: float = math.inf  # smallest gap between a kept and an evicted h2o score


class OracleSession:
    def __init__(self, model: NaiveLlama, spec: OracleSpec, less: list[dict] | None = None):
        self.m, self.spec, self.less = model, spec, less
        L, Hkv = model.L, model.Hkv
        self.K = [[[] for _ in range(Hkv)] for _ in range(L)]  # K[l][h][pos] -> [D], the whole history
        self.V = [[[] for _ in range(Hkv)] for _ in range(L)]
        self.heads = [[HeadCache() for _ in range(Hkv)] for _ in range(L)]
        if less is not None:
            R = less[0]["w2q"].shape[-1]
            for hc in (hc for row in self.heads for hc in row):
                hc.H, hc.z = torch.zeros(R, model.D, dtype=F64), torch.zeros(R, dtype=F64)
        self.seen = 0

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one chunk; returns logits [C, V] (float64)."""
        m, p0, C = self.m, self.seen, len(tokens)
        G, D = m.Hq // m.Hkv, m.D
        x = m.w["model.embed_tokens.weight"][torch.tensor(tokens)]  # [C, hidden]
        for layer in range(m.L):
            h = torch.stack([m.rms(x[t], m.p(layer, "input_layernorm")) for t in range(C)])
            q = (h @ m.p(layer, "self_attn.q_proj").T).view(C, m.Hq, D)
            k = (h @ m.p(layer, "self_attn.k_proj").T).view(C, m.Hkv, D)
            v = (h @ m.p(layer, "self_attn.v_proj").T).view(C, m.Hkv, D)
            q = torch.stack([torch.stack([m.rope(q[t, j], p0 + t) for j in range(m.Hq)]) for t in range(C)])
            k = torch.stack([torch.stack([m.rope(k[t, j], p0 + t) for j in range(m.Hkv)]) for t in range(C)])
            for hk in range(m.Hkv):
                self.K[layer][hk] += list(k[:, hk])
                self.V[layer][hk] += list(v[:, hk])
            out = torch.zeros(C, m.Hq, D, dtype=F64)
            mass = torch.zeros(m.Hkv, p0 + C, dtype=F64)
            for hk in range(m.Hkv):
                hc = self.heads[layer][hk]
                Kall, Vall = torch.stack(self.K[layer][hk]), torch.stack(self.V[layer][hk])  # [T, D]
                visible = torch.zeros(C, p0 + C, dtype=torch.bool)  # explicit mask over the full matrix
                visible[:, hc.cached] = True
                for t in range(C):
                    visible[t, p0 : p0 + t + 1] = True
                for g in range(G):
                    hq = hk * G + g
                    S = (q[:, hq] @ Kall.T) / math.sqrt(D)  # [C, T]: the full attention matrix
                    for t in range(C):
                        s = S[t][visible[t]]
                        mx = s.max()
                        e = torch.exp(s - mx)
                        num, den = e @ Vall[visible[t]], e.sum()
                        if self.less is not None:
                            ph = phi_map(q[t, hq], {n: w[hq] for n, w in self.less[layer].items()
                                                    if n in ("w1q", "w2q")})
                            num = num + torch.exp(-mx) * (ph @ hc.H)
                            den = den + torch.exp(-mx) * (ph @ hc.z)
                        out[t, hq] = num / den
                        mass[hk, visible[t]] += e / e.sum()
                self._admit_and_evict(layer, hk, list(range(p0, p0 + C)), mass[hk])
            o = out.reshape(C, m.Hq * D) @ m.p(layer, "self_attn.o_proj").T
            x = x + o
            h2 = torch.stack([m.rms(x[t], m.p(layer, "post_attention_layernorm")) for t in range(C)])
            gate, up = h2 @ m.p(layer, "mlp.gate_proj").T, h2 @ m.p(layer, "mlp.up_proj").T
            x = x + (gate * torch.sigmoid(gate) * up) @ m.p(layer, "mlp.down_proj").T
        self.seen += C
        xf = torch.stack([m.rms(x[t], m.w["model.norm.weight"]) for t in range(C)])
        return xf @ m.w["lm_head.weight"].T

    def _admit_and_evict(self, layer: int, hk: int, new: list[int], mass: torch.Tensor) -> None:
        hc, spec = self.heads[layer][hk], self.spec
        for j in hc.cached:
            hc.score[j] += float(mass[j])
        for j in new:
            hc.score[j] = float(mass[j])
        hc.cached = hc.cached + new
        T = new[-1] + 1
        worst = -math.inf  # the highest score evicted at this step (h2o)
        while len(hc.cached) > spec.budget:
            if spec.mode == "lambda":
                victim = next(j for j in hc.cached if j >= spec.sink)  # the oldest non-sink position
            elif spec.mode == "h2o":
                heavy = [j for j in hc.cached if j < T - spec.recent]  # outside the recent window
                victim = min(heavy, key=lambda j: (hc.score[j], j))
                worst = max(worst, hc.score[victim])
            else:
                raise AssertionError("the full policy never evicts")
            self._absorb(layer, hk, victim)
        kept_heavy = [hc.score[j] for j in hc.cached if j < T - spec.recent]
        if worst > -math.inf and kept_heavy:
            hc.min_margin = min(hc.min_margin, min(kept_heavy) - worst)

    def _absorb(self, layer: int, hk: int, j: int) -> None:
        hc = self.heads[layer][hk]
        hc.cached.remove(j)
        del hc.score[j]
        hc.evicted.append(j)
        if self.less is not None:
            w = {n: t[hk] for n, t in self.less[layer].items() if n in ("w1k", "w2k", "wint", "s1", "s2")}
            f = psi_map(self.K[layer][hk][j], w)
            hc.H = hc.H + torch.outer(f, self.V[layer][hk][j])
            hc.z = hc.z + f

    # --- the state an engine slot should hold ------------------------------------------------------
    def slot_view(self, layer: int, hk: int) -> dict[str, torch.Tensor]:
        """{pos, k, v, score [, H, z]} of the cached positions, in position order."""
        hc = self.heads[layer][hk]
        rows = lambda hist: torch.stack([hist[j] for j in hc.cached]) if hc.cached else torch.zeros(0, self.m.D)  # noqa: E731
        out = {"pos": torch.tensor(hc.cached, dtype=torch.int64),
               "k": rows(self.K[layer][hk]), "v": rows(self.V[layer][hk]),
               "score": torch.tensor([hc.score[j] for j in hc.cached], dtype=F64)}
        if self.less is not None:
            out["H"], out["z"] = hc.H, hc.z
        return out

    @property
    def min_margin(self) -> float:
        return min(hc.min_margin for row in self.heads for hc in row)
