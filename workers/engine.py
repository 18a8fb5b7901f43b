"""The compression engine: a Llama-family model over a slab of compressed session slots.

`forward(slots, tokens)` runs one step for a batch of slots: each layer attends to the slot's
compressed cache + LESS state + the chunk itself, then evict-and-absorb compresses the slot
back to budget. Prefill is chunked (chunks cut at absolute multiples of `prefill_chunk`),
decode batches many sessions of different lengths in one forward.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from lessserve.kernels import ops
from lessserve.kernels.dispatch import resolve
from lessserve.kernels.fast_attention import attend_cat
from lessserve.kernels.reference.recall import (
    Lent,
    choose_pages,
    end_pins,
    glued_pages,
    group_queries,
    history_page_mass,
    page_tokens,
    recall_layers_ref,
    redundant_pages,
    return_layer_ref,
    top_heads_score,
    unread_layer_ref,
)
from lessserve.workers.compiled import compiled_attend
from lessserve.workers.compression import Policy, eviction_spec, less_state_tokens
from lessserve.workers.config import EngineConfig
from lessserve.workers.constraints import Grammars
from lessserve.workers.cuda_graphs import DecodeGraphs, EagerReplay, backend_for, buckets
from lessserve.workers.errors import ConfigError, ContextOverflowError
from lessserve.workers.history import Histories
from lessserve.workers.less_weights import (
    LessWeights,
    check_bound,
    model_fingerprint,
    shipped_rank,
    shipped_weights_path,
)
from lessserve.workers.model import LlamaModel
from lessserve.workers.model_loader import LoadedCheckpoint, load_checkpoint, load_tokenizer
from lessserve.workers.slots import SlotSlab

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_chat_template(value: str) -> str:
    """--chat-template: a file holding a Jinja template, or the template itself."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"chat_template: no such file, and not a Jinja template: {value!r}")
    return path.read_text()


def stop_ids(folder: Path, tokenizer) -> tuple[int, ...]:
    """Token ids that end a turn: the tokenizer's eos and every eos id of generation_config.json
    (Llama 3 instruct ends its turns with <|eot_id|>, which is not the tokenizer's eos)."""
    ids = [] if tokenizer is None or tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    return tuple(dict.fromkeys(ids))


def auto_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """dtype "auto": on CUDA the stored half dtype (float32 checkpoints run in bfloat16); on the CPU
    float32 (half-precision matmuls are slow there; `--dtype bfloat16` keeps a bf16 checkpoint as is)."""
    if device.type == "cuda":
        return stored if stored in (torch.float16, torch.bfloat16) else torch.bfloat16
    return torch.float32


def prefill_chunks(start: int, count: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(offset, size) pieces of `count` tokens starting at absolute position `start`, cut at
    absolute multiples of `chunk` so the same transcript always splits the same way."""
    off = 0
    while off < count:
        size = min(chunk - (start + off) % chunk, count - off)
        yield off, size
        off += size


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    def __init__(self, cfg: EngineConfig | None = None, checkpoint: LoadedCheckpoint | None = None,
                 less: LessWeights | None = None, tokenizer=None, model: LlamaModel | None = None):
        self.cfg = cfg = cfg or EngineConfig()
        self.device = pick_device(cfg.device)
        self.impl = resolve(cfg.kernels, self.device)
        ckpt = checkpoint or load_checkpoint(cfg.model)
        self.dtype = _DTYPES.get(cfg.dtype) or auto_dtype(self.device, ckpt.stored_dtype)
        self.model_id, self.args, self.folder = ckpt.model_id, ckpt.args, ckpt.folder
        self.less_note: str | None = None  # LESS weights chosen at another budget than served
        self.tokenizer = tokenizer if tokenizer is not None else (
            load_tokenizer(ckpt.folder) if (ckpt.folder / "tokenizer_config.json").is_file() else None
        )
        if model is None:  # a model may be shared by several engines (evaluations, benchmarks)
            model = LlamaModel.from_checkpoint(ckpt, self.device, self.dtype)
        self.model = model
        ctx = self.args.context_len
        if cfg.max_model_len is not None and cfg.max_model_len > ctx:
            raise ConfigError(f"max_model_len {cfg.max_model_len} exceeds the model's context of {ctx} tokens "
                              f"({self.model_id}: {self._context_reason()})")
        self.max_model_len = cfg.max_model_len or ctx
        if cfg.chat_template and self.tokenizer is not None:  # on a copy: a tokenizer passed in may be shared
            self.tokenizer = copy.copy(self.tokenizer)
            self.tokenizer.chat_template = read_chat_template(cfg.chat_template)
        self.stop_ids = stop_ids(ckpt.folder, self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.stop_ids)  # structured outputs, token bytes
        self.policy = Policy.parse(cfg.policy)
        if self.policy.recall and cfg.kv_bits != "native":  # recall writes K/V straight into slab.k / slab.v
            raise ConfigError(f"kv_bits {cfg.kv_bits}: {self.policy.name} needs kv_bits native (+recall writes "
                              "keys and values straight into the slots)")
        self.less = self._load_less(less)
        rank = self.less.rank if self.less else (self._plus_rank() if self.policy.plus else 0)
        extra = less_state_tokens(rank, self.args.head_dim, self.dtype.itemsize, cfg.kv_bits) if rank else 0
        self.less_state_tokens = extra
        reserve = cfg.recall_pages * cfg.recall_page if self.policy.recall else 0
        self.spec = eviction_spec(self.policy, cfg.budget, cfg.recent, cfg.sink, cfg.max_context, extra, reserve)
        self.scale = self.args.head_dim ** -0.5
        backend, self.graphs_off = backend_for(self.device) if cfg.cuda_graphs else (None, "cuda_graphs is off")
        self.compiled, self.compile_off = compiled_attend(cfg.compile, self.impl, self.spec,
                                                          len(buckets(cfg.max_slots)), cfg.kv_bits)
        # evict-and-absorb of quantised slots has no Triton kernel: it runs the torch path (kernels/ops.py)
        self.evict_impl = ops.QUANT_EVICT_IMPL[self.impl] if cfg.kv_bits != "native" else self.impl
        if self.evict_impl != self.impl:
            log.info("kv_bits %s with kernels=%s: attention reads the codes in Triton, evict-and-absorb runs "
                     "the torch path", cfg.kv_bits, self.impl)
        if backend is None and self.compiled is not None:  # the compiled step runs in the same buckets, eagerly
            backend = EagerReplay()
        self.slab = SlotSlab(self.args.num_layers, self.args.num_kv_heads, self.args.head_dim,
                             cfg.max_slots + (backend is not None), self.spec.budget,
                             self.less.rank if self.less else 0, self.device, self.dtype, cfg.kv_bits)
        self.histories: Histories | None = None
        self._marks: tuple[torch.Tensor, torch.Tensor] | None = None  # +recall: the vocabulary's word marks
        self.reread = min(cfg.recall_reread, self.spec.recent)  # +recall: a turn's last tokens the round reads again
        if self.policy.recall and cfg.recall_layer >= self.args.num_layers:
            raise ConfigError(f"recall_layer {cfg.recall_layer}: {self.model_id} has "
                              f"{self.args.num_layers} layers (0 to {self.args.num_layers - 1})")
        if self.policy.recall:
            self.histories = self.slab.histories = Histories(self.args.num_layers, self.args.num_kv_heads,
                                                             self.args.head_dim, self.dtype, cfg.recall_page,
                                                             cfg.history_bytes)
        self.graphs: DecodeGraphs | None = None
        if backend is not None:  # one extra slot, never handed out: the buckets' padding rows point at it
            step = lambda t, s, p: self._step(t, s, p, last_only=True, bucketed=True)[:, -1]  # noqa: E731
            self.graphs = DecodeGraphs(step, cfg.max_slots, self.slab.alloc(), self.device, backend)

    # --- setup ------------------------------------------------------------------------------
    def _context_reason(self) -> str:
        a = self.args
        if a.sliding_window is not None and a.sliding_window == a.context_len:
            return f"sliding_window {a.sliding_window}: exact only below it"
        r = a.rotary
        return f"max_position_embeddings {a.max_position_embeddings}" + (
            f", {r.rope_type} RoPE x{r.factor:g}" if r.rope_type not in ("default", "llama3") else "")

    def _load_less(self, less: LessWeights | None) -> LessWeights | None:
        if not self.policy.less:
            return None
        if less is None:
            path = self.cfg.less_weights or shipped_weights_path(self.model_id, self.policy.base, self.cfg.budget)
            less = LessWeights.load(path)
        a = self.args
        if len(less.layers) != a.num_layers or less.layers[0].w1q.shape[:2] != (a.num_heads, a.head_dim) \
                or less.layers[0].w1k.shape[0] != a.num_kv_heads:
            raise ConfigError(f"LESS weights (manifest model {less.manifest.get('model')!r}) do not fit "
                              f"{self.model_id}: {a.num_layers} layers, {a.num_heads}/{a.num_kv_heads} heads")
        note = check_bound(less, model_fingerprint(a, self.folder), self.model_id, self.cfg.budget)
        if note:  # a file given explicitly, or shipped weights declaring this budget among those they serve
            log.warning("%s", note)
            self.less_note = note
        return less.to(self.device, torch.float32)

    def _plus_rank(self) -> int:
        """Rank of the LESS state the `+` baseline matches in memory (the shipped weights', else 8)."""
        return shipped_rank(self.model_id, self.policy.base) or 8

    @property
    def less_digest(self) -> str:
        return self.less.digest() if self.less else "none"

    # --- sessions ---------------------------------------------------------------------------
    def alloc(self) -> int:
        return self.slab.alloc()

    def free(self, slot: int) -> None:
        self.slab.free(slot)

    def stats(self, slot: int) -> dict:
        out = {"cached_tokens": self.slab.cached_tokens(slot), "tokens_seen": self.slab.seen[slot],
               "cache_bytes": self.slab.slot_bytes()}
        if self.histories is not None:
            h = self.histories.get(slot)
            out.update(history_bytes=h.nbytes(), history_tokens=h.held, recalled_entries=h.recalled)
        return out

    # --- the step ---------------------------------------------------------------------------
    def _check_step(self, slots: Sequence[int], C: int) -> None:
        """Host-side checks only (the full policy's length is `seen`: nothing is evicted)."""
        for s in slots:
            self.slab.check(s)
            if self.slab.seen[s] + C > self.max_model_len:
                raise ContextOverflowError(
                    f"session would reach {self.slab.seen[s] + C} tokens; the model's limit is "
                    f"max_model_len={self.max_model_len}")
            if self.spec.mode == "full" and self.slab.seen[s] + C > self.spec.budget:
                raise ContextOverflowError(
                    f"session would hold {self.slab.seen[s] + C} tokens; the full policy's limit "
                    f"is max_context={self.spec.budget}")

    @torch.inference_mode()
    def forward(self, slots: Sequence[int], tokens: torch.Tensor, last_only: bool = False,
                recall: bool = False) -> torch.Tensor:
        """slots: n slot ids; tokens [n, C] -> logits [n, C, V] (or [n, 1, V]). `recall` (a `+recall`
        engine, the last chunk of a turn's prompt): after the chunk's step, the recall round brings the
        history pages its last queries choose back into each slot (`_bring_back`), and the chunk's last
        `recall_reread` tokens are read again over the slot as it is then (`_reread`): the last one's
        logits, from which the reply starts, see the recalled pages (the others keep the step's).
        With `recall_layer` L > 0 the queries of the layers below L choose and the re-read starts at
        L; a chunk the re-read would cover whole (last_only) runs once, the round inside its step
        before layer L."""
        n, C = tokens.shape
        self._check_step(slots, C)
        slots = list(slots)
        seen = [self.slab.seen[s] for s in slots]
        slot_ids = torch.tensor(slots, dtype=torch.long, device=self.device)
        positions = torch.tensor(seen, dtype=torch.long, device=self.device)[:, None] \
            + torch.arange(C, device=self.device)[None, :]  # [n, C]
        # a slot holds at most `seen` entries: the host knows a bound on every length without a device sync
        max_len = min(max(seen), self.slab.capacity)
        host = (slots, seen) if self.spec.mode == "full" else None  # full policy: length == seen
        hist = None
        if self.histories is not None:
            hist = [self.histories.touch(s) for s in slots]
            for h, s, row in zip(hist, seen, tokens.cpu(), strict=True):
                h.reserve(C)
                h.write_ids(s, row)
        at = self.cfg.recall_layer  # 0: the round runs after the step (every layer chooses, every layer re-read)
        round_ = recall and hist is not None
        if round_:
            self.end_turn(slots)  # pages of a turn whose end was not seen go back first
        one_pass = round_ and at > 0 and last_only and C <= self.reread
        if one_pass:  # the round runs inside the step, before layer `at`: the layers from it read the chunk
            def on_layer(layer: int, lengths: torch.Tensor) -> None:  # with the pages back
                if layer == at:
                    self._bring_back(slots, hist, seen, at, lengths)

            logits = self._step(tokens.to(self.device), slot_ids, positions, last_only, max_len, host,
                                history=(seen, hist), on_layer=on_layer)
        else:
            taps = {at: None} if round_ else None  # where the re-read starts: the hidden states it starts from
            logits = self._step(tokens.to(self.device), slot_ids, positions, last_only, max_len, host,
                                history=(seen, hist) if hist is not None else None,
                                head=not (round_ and last_only), taps=taps)  # the re-read gives the last logits
        for s in slots:
            self.slab.seen[s] += C
        if hist is not None:
            for h in hist:
                h.advance(C)
            self.histories.enforce()
        if round_ and not one_pass:
            self._bring_back(slots, hist, [self.slab.seen[s] for s in slots], at or self.args.num_layers)
            k = min(self.reread, C)  # the chunk's last k: the recent window holds them
            last = self._reread(slots, hist, tokens[:, -k:].to(self.device), positions[:, -k:], taps[at][:, -k:])
            logits = last if last_only else torch.cat([logits[:, :-1], last], dim=1)
        return logits

    def _step(self, tokens: torch.Tensor, slot_ids: torch.Tensor, positions: torch.Tensor,
              last_only: bool, max_len: int | None = None,
              host: tuple[list[int], list[int]] | None = None, bucketed: bool = False,
              history: tuple | None = None, head: bool = True,
              taps: dict[int, torch.Tensor | None] | None = None,
              on_layer: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """The device-side step (no host synchronisation, so a CUDA graph can capture it):
        tokens [n, C], slot_ids [n], positions [n, C] -> logits [n, C or 1, V]; slot lengths updated.
        `max_len` / `host`: what the host knows of the slots' lengths (ops.attend_evict); None for a
        bucket's step (graph or compiled), whose shapes must not depend on them. `history`: (seen,
        History per slot) of a `+recall` engine's eager step: each layer's chunk K/V is recorded
        and its last queries kept. `taps`: hidden states to keep (the model's forward). `on_layer`:
        called before each layer with the slots' lengths the layers below left (an eager step's)."""
        slab, less, spec = self.slab, self.less, self.spec
        attend_evict = self.compiled if bucketed and self.compiled is not None else \
            functools.partial(ops.attend_evict, impl=self.impl)
        new_length = slab.length

        def attend(layer: int, q, k, v):
            nonlocal new_length
            lw = less.layers[layer] if less else None
            if on_layer is not None:
                on_layer(layer, new_length)
            if history is not None:
                self._record(layer, q, k, v, *history)
            if slab.quantised:  # kv_bits 8 / 4: codes and scales (kernels/reference/quant_slots.py)
                out, new_length = ops.attend_evict_quant(
                    q, k, v, slab.kv(layer), slab.pos[layer], slab.score[layer], slab.length, slot_ids, positions,
                    self.scale, spec, H=slab.H[layer] if lw is not None else None,
                    z=slab.z[layer] if lw is not None else None, phi_q=ops.phi(q, lw) if lw is not None else None,
                    psi=lw, impl=self.impl, max_len=max_len)
                return out
            out, new_length = attend_evict(
                q, k, v, slab.k[layer], slab.v[layer], slab.pos[layer], slab.score[layer], slab.length, slot_ids,
                positions, self.scale, spec, H=slab.H[layer] if lw is not None else None,
                z=slab.z[layer] if lw is not None else None, phi_q=ops.phi(q, lw) if lw is not None else None,
                psi=lw, max_len=max_len, host=host)
            return out

        logits = self.model(tokens, positions, attend, last_only=last_only, head=head, taps=taps)
        slab.length[slot_ids] = new_length.to(slab.length.dtype)
        return logits

    def _choose_pages(self, hist: list, seen: list[int], layers: int) -> list[torch.Tensor]:
        """The history tokens a recall round brings back, per slot [m] (history indices, best page
        first). The last `recall_queries` queries the sessions kept (the prompt's last tokens, this
        step's included) score every history page at each of the first `layers` layers and every KV
        head: the attention mass its best query puts on it, summed over the `recall_heads`
        layer-heads that put the most on it (kernels/reference/recall.py); pages eviction keeps
        anyway are left out. The keys are read where the history holds them."""
        cfg, P, Hkv = self.cfg, self.cfg.recall_page, self.args.num_kv_heads
        out = []
        for h, s in zip(hist, seen, strict=True):
            if not h.pages or h.queries is None:
                out.append(torch.zeros(0, dtype=torch.long))
                continue
            queries = group_queries(torch.stack(h.queries[:layers]), Hkv)  # [l, Hkv, G * Q, D]: the layers at once
            keys = [b[:layers].to(self.device) for b in h.key_blocks(h.pages * P)]  # [l, Hkv, m, D] each
            mass = history_page_mass(queries, keys, self.scale, P, cfg.recall_lead).flatten(0, 1)  # [l * Hkv, pages]
            score = top_heads_score(mass, cfg.recall_heads).cpu()  # [pages]
            first = h.base + torch.arange(h.pages) * P  # first position of each page
            skip = (first >= s - self.spec.recent) | (first + P <= self.spec.sink)  # kept anyway
            ids = h.ids()
            skip |= redundant_pages(ids, P, h.pages, self.spec.recent)  # the slot holds their like
            glued = glued_pages(ids, P, h.pages, *self._word_marks()) if self.tokenizer is not None else None
            out.append(page_tokens(choose_pages(score, cfg.recall_pages, skip, glued), P, h.held))
        return out

    def _word_marks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per vocabulary id: does its text start with a letter or digit (no space: inside a word), and
        does it end with one. Built once per engine, at its first recall round."""
        if self._marks is None:
            texts = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            words = [self.tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in texts]
            self._marks = (torch.tensor([w[:1].isalnum() for w in words]),
                           torch.tensor([w[-1:].isalnum() for w in words]))
        return self._marks

    def _record(self, layer: int, q, k, v, seen: list[int], hist: list) -> None:
        """One layer of a `+recall` step: the chunk's K/V [n, Hkv, C, D] goes to each session's history,
        and its queries join the last `recall_queries` kept for the next round's choice."""
        for i, h in enumerate(hist):
            h.keep_queries(layer, q[i], self.cfg.recall_queries)
            h.write(seen[i], k[i].to("cpu", h.dtype), v[i].to("cpu", h.dtype), layer)

    def _bring_back(self, slots: list[int], hist: list, seen: list[int], layers: int,
                    below: torch.Tensor | None = None) -> None:
        """The recall round's pages: those the queries of the first `layers` layers choose come back into
        every layer of each slot (kernels/reference/recall.py: the least relevant entries make room, the
        LESS state stays exact), lent to the turn (`end_turn` returns them). `below` [n]: the lengths
        of the layers under `layers`, when the round runs inside a step that has read the chunk there
        only (the layers from `layers` up hold the lengths before the chunk)."""
        slab, less, Hkv = self.slab, self.less, self.args.num_kv_heads
        chosen = self._choose_pages(hist, seen, layers)
        back = [h.rows(want) for h, want in zip(hist, chosen, strict=True)]  # ([L, Hkv, m, D], same) per slot
        for h in hist:
            h.lent = [Lent() for _ in range(self.args.num_layers)]
        L = self.args.num_layers
        for i, (s, h, want, (wk, wv)) in enumerate(zip(slots, hist, chosen, back, strict=True)):
            if not len(want):  # nothing to bring back: only pins a turn's end did not return end
                end_pins(slab.score[:, s])
                continue
            now = int(slab.length[s])
            # the round inside a step (one pass): the layers below `layers` have read the chunk (and kept
            # its queries), the others not yet
            parts = [(0, layers, int(below[i])), (layers, L, now)] if below is not None else [(0, L, now)]
            for lo, hi, length in parts:
                queries = group_queries(torch.stack(h.queries[lo:hi]), Hkv)  # [hi - lo, Hkv, G * Q, D]
                h.recalled += int(recall_layers_ref(
                    slab.k[lo:hi, s], slab.v[lo:hi, s], slab.pos[lo:hi, s], slab.score[lo:hi, s], length,
                    queries, want, wk[lo:hi], wv[lo:hi], h.base, self.spec.recent, self.spec.sink, self.scale,
                    H=slab.H[lo:hi, s] if less else None, z=slab.z[lo:hi, s] if less else None,
                    psi=less.layers[lo:hi] if less else None, lent=h.lent[lo:hi]).sum())

    def _reread(self, slots: list[int], hist: list, tokens: torch.Tensor, positions: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
        """After `_bring_back`, the chunk's last k tokens (tokens / positions [n, k], k at most the recent
        window, so they are the slot's last k entries) are read again over the slot as it is now: from
        layer `recall_layer` up (x [n, k, hidden]: the hidden states the step gave them there) their
        K/V, computed this time with the pages back, replace their own entries and history records
        (`end_turn` gives the step's back), and they attend over the slot. Returns the last one's
        logits [n, 1, V], the reply's first: the prompt's own tokens keep the predictions their step
        made before the round (the round changes what follows the prompt, not how the prompt was read)."""
        slab, less = self.slab, self.less
        k = tokens.shape[1]
        lengths = [int(slab.length[s]) for s in slots]
        at = [int(p) for p in positions[:, 0]]
        for s, ln, row in zip(slots, lengths, positions.to(slab.pos.device, slab.pos.dtype), strict=True):
            assert bool((slab.pos[:, s, :, ln - k : ln] == row).all()), "re-read tokens left the recent window"

        def attend(layer: int, q, kk, v):  # q [n, Hq, k, D], kk / v [n, Hkv, k, D]: the tokens', pages back
            lw = less.layers[layer] if less else None
            outs = []
            for i, (s, ln, h) in enumerate(zip(slots, lengths, hist, strict=True)):
                lent = h.lent[layer]  # the turn's end gives the tokens their step's K/V back
                lent.read_at = at[i]
                lent.read_k = slab.k[layer, s, :, ln - k : ln].to("cpu", copy=True)  # [Hkv, k, D]
                lent.read_v = slab.v[layer, s, :, ln - k : ln].to("cpu", copy=True)
                lent.new_k, lent.new_v = kk[i].to("cpu", h.dtype, copy=True), v[i].to("cpu", h.dtype, copy=True)
                slab.k[layer, s, :, ln - k : ln], slab.v[layer, s, :, ln - k : ln] = kk[i], v[i]
                h.write(at[i], lent.new_k, lent.new_v, layer)  # the history holds what the slot does
                keys, values = slab.k[layer, s : s + 1, :, :ln], slab.v[layer, s : s + 1, :, :ln]
                less_terms = (slab.H[layer, s : s + 1], slab.z[layer, s : s + 1], ops.phi(q[i : i + 1], lw)) \
                    if lw is not None else (None, None, None)
                valid = torch.ones(1, ln - k, dtype=torch.bool, device=q.device)
                outs.append(attend_cat(q[i : i + 1], keys, values, valid, self.scale, *less_terms)[0])
            return torch.cat(outs)

        return self.model(tokens, positions, attend, last_only=True, start=self.cfg.recall_layer, x=x)

    @torch.inference_mode()
    def end_turn(self, slots: Sequence[int]) -> None:
        """A turn's reply has ended (`+recall`): the pages its round lent each slot go back, the entries
        they replaced return with their eviction scores (kernels/reference/recall.py, `return_layer_ref`),
        and the re-read tokens get their step's K/V back, in the slot, the LESS state and the history
        (`unread_layer_ref`), so the next turn is read over what the policy itself kept. No-op for a slot
        with nothing lent."""
        if self.histories is None:
            return
        slab, less = self.slab, self.less
        for s in slots:
            h = self.histories.by_slot.get(s)
            lent = None if h is None else h.lent
            if lent is None:
                continue
            h.lent = None
            length = int(slab.length[s])  # swaps keep it
            for layer, record in enumerate(lent):
                lw = less.layers[layer] if less else None
                state = dict(H=slab.H[layer, s], z=slab.z[layer, s], psi=lw) if lw is not None else {}
                return_layer_ref(slab.k[layer, s], slab.v[layer, s], slab.pos[layer, s], slab.score[layer, s],
                                 length, record, **state)
                unread_layer_ref(slab.k[layer, s], slab.v[layer, s], slab.pos[layer, s], length, record, **state)
                if record.read_k is not None and record.read_at >= h.base:
                    h.write(record.read_at, record.read_k.to(h.dtype), record.read_v.to(h.dtype), layer)

    def record_decoded(self, slots: Sequence[int], tokens: Sequence[int]) -> None:
        """A `+recall` engine's decode step that ran as a captured graph: each slot's newest token is its
        last entry at every layer and head (the recent window keeps it), copied into its history."""
        for s, tok in zip(slots, tokens, strict=True):
            h = self.histories.touch(s)
            h.reserve(1)
            h.write_ids(h.n, torch.tensor([tok]))
            last = int(self.slab.length[s]) - 1
            h.write(h.n, self.slab.k[:, s, :, last, None].to("cpu", h.dtype),
                    self.slab.v[:, s, :, last, None].to("cpu", h.dtype))
            h.advance(1)
        self.histories.enforce()

    def chunks(self, start: int, count: int) -> Iterator[tuple[int, int]]:
        """(offset, size) pieces of a turn's `count` prompt tokens from position `start`. A `+recall`
        engine's last piece is cut like any other (cutting it to the re-read's length made h2o evict
        between the question's tokens: dev perplexity +0.9 to +2.1% against h2o, for no recall gained)."""
        return prefill_chunks(start, count, self.cfg.prefill_chunk)

    @torch.inference_mode()
    def prefill(self, slot: int, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Feed new tokens to one session. Returns logits [V] of the last token, or [T, V]."""
        if len(ids) == 0:
            raise ValueError("prefill needs at least one token")
        t = torch.as_tensor(list(ids), dtype=torch.long)
        outs = []
        for off, size in self.chunks(self.slab.seen[slot], len(t)):
            lg = self.forward([slot], t[None, off : off + size], last_only=not all_logits)
            outs.append(lg[0])
        return torch.cat(outs, dim=0) if all_logits else outs[-1][-1]

    @torch.inference_mode()
    def warm_up(self) -> dict[int, str]:
        """Capture / compile every batch bucket's decode step now (on the pad slot only), not on the
        first step of each size. Returns the buckets that will run eagerly, with the reason."""
        if self.graphs is not None:
            self.graphs.prepare()
            return dict(self.graphs.fallback)
        return {}

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """One decode step for many sessions together. Returns logits [n, V]. With cuda_graphs on a
        CUDA device, through the captured graph of the batch's bucket (eagerly where capture failed);
        with compile, through the bucket's compiled step."""
        if self.graphs is not None:
            self._check_step(slots, 1)
            out = self.graphs.run(slots, tokens, [self.slab.seen[s] for s in slots])
            if out is not None:
                for s in slots:
                    self.slab.seen[s] += 1
                if self.histories is not None:
                    self.record_decoded(slots, tokens)
                return out.clone()  # the graph's output buffer is overwritten by the next replay
        t = torch.as_tensor(list(tokens), dtype=torch.long)[:, None]
        return self.forward(slots, t, last_only=True)[:, -1]
