"""LESS weights (phi/psi weights per layer): a safetensors file plus a JSON manifest.

Layout: tensors `layers.{i}.{w1q,w2q,w1k,w2k,wint,s1,s2}`; manifest `<file>.json` with at least
{"model", "policy", "budget", "rank", "hidden"}, and `model_fingerprint` (`model_fingerprint`: the
architecture, shapes and tokenizer they were trained on). Shipped weights live in `less_weights/`,
one file per (model, policy, budget trained at). A shipped file may also declare, in its manifest's
`serves_budgets` [lo, hi], the budgets it was validated at on the dev split (for example the larger
budgets that quantised slots of the same bytes hold, docs/quality/equal_bytes.md); an engine at a
budget no shipped file trained at or declares finds none and must be given a file explicitly
(`--less-weights`). Nothing falls back to another budget silently.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lessserve.kernels.reference.lowrank import LessLayerWeights
from lessserve.workers.errors import ConfigError, LessWeightsMissingError

SHIPPED_DIR = Path(__file__).parent / "less_weights"
FIELDS = ("w1q", "w2q", "w1k", "w2k", "wint", "s1", "s2")


@dataclass
class LessWeights:
    layers: list[LessLayerWeights]
    manifest: dict

    @property
    def rank(self) -> int:
        return int(self.manifest["rank"])

    def digest(self) -> str:
        """Content hash: a cache written under other kernels must never be restored under these."""
        h = hashlib.sha256()
        for w in self.layers:
            for f in FIELDS:
                h.update(getattr(w, f).detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, device, dtype=torch.float32) -> LessWeights:
        return LessWeights([w.to(device, dtype) for w in self.layers], self.manifest)

    def save(self, path: str | Path, dtype=torch.float16) -> None:
        path = Path(path)
        tensors = {
            f"layers.{i}.{f}": getattr(w, f).detach().to(dtype).contiguous().cpu()
            for i, w in enumerate(self.layers) for f in FIELDS
        }
        save_file(tensors, str(path))
        path.with_suffix(".json").write_text(json.dumps(self.manifest, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LessWeights:
        path = Path(path)
        man_path = path.with_suffix(".json")
        if not path.is_file() or not man_path.is_file():
            raise ConfigError(f"LESS weights file {path} or its manifest {man_path.name} is missing")
        manifest = json.loads(man_path.read_text())
        missing = {"model", "policy", "budget", "rank", "hidden", "num_layers"} - manifest.keys()
        if missing:
            raise ConfigError(f"LESS weights manifest {man_path} lacks {sorted(missing)}")
        t = load_file(str(path))
        layers = [
            LessLayerWeights(**{f: t[f"layers.{i}.{f}"].float() for f in FIELDS})
            for i in range(int(manifest["num_layers"]))
        ]
        return cls(layers, manifest)

    @classmethod
    def random(cls, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, rank: int = 8,
               hidden: int = 64, seed: int = 0, scale_init: float = 1e-4, model: str = "random",
               policy: str = "h2o", budget: int = 128) -> LessWeights:
        g = torch.Generator().manual_seed(seed)
        r = lambda *s, fan: torch.randn(*s, generator=g) / fan**0.5  # noqa: E731
        layers = [
            LessLayerWeights(
                w1q=r(num_heads, head_dim, hidden, fan=head_dim), w2q=r(num_heads, hidden, rank, fan=hidden),
                w1k=r(num_kv_heads, head_dim, hidden, fan=head_dim), w2k=r(num_kv_heads, hidden, rank, fan=hidden),
                wint=r(num_kv_heads, rank, rank, fan=rank),
                s1=torch.full((num_kv_heads, rank), scale_init), s2=torch.full((num_kv_heads, rank), scale_init),
            )
            for _ in range(num_layers)
        ]
        manifest = {"model": model, "policy": policy, "budget": budget, "rank": rank, "hidden": hidden,
                    "num_layers": num_layers, "random": True}
        return cls(layers, manifest)


def model_fingerprint(args, folder: Path) -> str:
    """A hash of what LESS weights are bound to: the decoder's shape as this package reads it
    (ModelArgs: architecture, sizes, norms, RoPE) and the tokenizer's vocabulary and merges, both
    canonicalised, so another transformers or tokenizers version writing the same model's files
    differently gives the same fingerprint."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(args), sort_keys=True, default=str).encode())
    tok = Path(folder) / "tokenizer.json"
    if tok.is_file():
        st = tok.stat()
        h.update(_vocab_digest(str(tok), st.st_mtime_ns, st.st_size))
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _vocab_digest(path: str, mtime_ns: int, size: int) -> bytes:  # the canonical JSON, as the fingerprint hashes it
    """The canonical vocabulary and merges of a tokenizer.json (0.3 s to parse for a 49k vocabulary:
    read once per file version, not once per engine)."""
    model = json.loads(Path(path).read_text()).get("model", {})
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    return json.dumps({"type": model.get("type"), "vocab": model.get("vocab"), "merges": merges},
                      sort_keys=True).encode()


def check_bound(less: LessWeights, fingerprint: str, model_id: str, budget: int) -> str | None:
    """ConfigError when `less` was trained for another model (its manifest's fingerprint differs);
    returns a note when it was trained at another budget than `budget` (chosen explicitly)."""
    bound = less.manifest.get("model_fingerprint")
    if bound is not None and bound != fingerprint:
        raise ConfigError(f"LESS weights trained for model {less.manifest.get('model')!r} (fingerprint {bound}) "
                          f"do not fit {model_id!r} (fingerprint {fingerprint}): train weights for this model")
    trained = int(less.manifest.get("budget", budget))
    return None if trained == budget else f"LESS weights trained at budget {trained}, serving budget {budget}"


def serves_budgets(path: Path) -> tuple[int, int]:
    """The budgets a weights file serves: its manifest's `serves_budgets` [lo, hi], else its training budget."""
    man = json.loads(path.with_suffix(".json").read_text())
    lo, hi = man.get("serves_budgets", [man["budget"], man["budget"]])
    return int(lo), int(hi)


def shipped_weights_path(model_id: str, base_policy: str, budget: int) -> Path:
    """The weights shipped for this model, policy and budget: those trained at it, else one whose
    manifest declares it among the budgets it serves (`serves_budgets`); LessWeightsMissingError
    (naming the budgets shipped, and how to choose one) when there are none."""
    exact = SHIPPED_DIR / f"{model_id}-{base_policy}-b{budget}.safetensors"
    if exact.is_file():
        return exact
    others = sorted(SHIPPED_DIR.glob(f"{model_id}-{base_policy}-b*.safetensors"))
    for p in others:
        lo, hi = serves_budgets(p)
        if lo <= budget <= hi:
            return p
    if others:
        spans = [serves_budgets(p) for p in others]
        trained = ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in spans)
        raise LessWeightsMissingError(
            f"policy {base_policy}+less at budget {budget}: LESS weights for {model_id!r} are shipped for budget "
            f"{trained} only. Serve that budget, pass one of them explicitly (--less-weights {others[0]}), or "
            f"train weights for this budget (`lessserve train-less --policy {base_policy} --budget {budget}`)")
    raise LessWeightsMissingError(
        f"policy {base_policy}+less needs trained LESS weights for model {model_id!r}; none shipped. "
        f"Train them with `lessserve train-less --model {model_id} --policy {base_policy}` "
        f"and pass --less-weights FILE"
    )


def shipped_rank(model_id: str, base_policy: str) -> int | None:
    """The rank of the LESS state shipped for this model and policy (any budget), None if none."""
    for path in sorted(SHIPPED_DIR.glob(f"{model_id}-{base_policy}-b*.json")):
        return int(json.loads(path.read_text())["rank"])
    return None
