"""Independent replays for exact checks: a transcript re-fed to a fresh engine slot through chunks
this module cuts itself (absolute multiples of prefill_chunk, docs/engine.md), and a slot's state
compared field by field, bit for bit."""

from __future__ import annotations

import torch

from lessserve.kernels.reference.pack import dequantize_int8_ref, quantize_int8_ref

FIELDS = ("k", "v", "pos", "score", "H", "z", "length", "seen")


def feed(engine, slot: int, ids: list[int]) -> torch.Tensor | None:
    """Feed `ids` to `slot` from the position it has reached, in chunks cut at absolute multiples of
    prefill_chunk; returns the last token's logits [V] (None for no ids)."""
    chunk, start, off, logits = engine.cfg.prefill_chunk, engine.slab.seen[slot], 0, None
    while off < len(ids):
        size = min(chunk - (start + off) % chunk, len(ids) - off)
        logits = engine.forward([slot], torch.tensor([ids[off : off + size]]), last_only=True)[0, -1]
        off += size
    return logits


def replay(engine, ids: list[int]) -> int:
    """A fresh slot of `engine` that consumed `ids` from position 0, chunk by chunk; returns the slot."""
    slot = engine.alloc()
    feed(engine, slot, ids)
    return slot


def greedy(engine, slot: int, ids: list[int], max_new_tokens: int, stop_ids=None) -> list[int]:
    """The reference of a greedy turn, one session alone and no scheduler: `ids` fed to `slot`, then
    argmax tokens fed back one by one until a stop id (included; the engine's by default) or
    `max_new_tokens`."""
    stop = engine.stop_ids if stop_ids is None else stop_ids
    logits, out = feed(engine, slot, ids), []
    while True:
        out.append(int(logits.float().argmax()))
        if out[-1] in stop or len(out) == max_new_tokens:
            return out
        logits = engine.decode([slot], [out[-1]])[0]


def scheduled(engine, ids: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """What the batch scheduler, the one generation loop of the server and the CLI, samples greedily
    for `ids` in a fresh slot of `engine` (no stop id unless given)."""
    from lessserve.workers.scheduler import BatchScheduler, SamplingParams

    with BatchScheduler(engine) as sched:
        return sched.complete(ids, SamplingParams(max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids)))


def decode_schedule(engine, prompts: list[list[int]], steps: list[list[int]]) -> tuple[list[torch.Tensor], list[int]]:
    """Each prompt prefilled into its own slot, then decode steps over the given subsets of those
    sessions (indices into `prompts`), fed fixed tokens. Returns each step's logits and the slots."""
    slots = [engine.alloc() for _ in prompts]
    for s, p in zip(slots, prompts, strict=True):
        engine.prefill(s, p)
    out = []
    for i, which in enumerate(steps):
        out.append(engine.decode([slots[j] for j in which], [(7 * i + j) % 100 for j in which]))
    return out, slots


def int8_round_trip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What an int8 offload must restore: k and v quantised and dequantised, the rest untouched."""
    out = dict(state)
    for f in ("k", "v"):
        out[f] = dequantize_int8_ref(*quantize_int8_ref(state[f]), state[f].dtype)
    return out


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str,
                      fields: list[str] | None = None) -> None:
    """Every slot field (by default a native slot's) equal bit for bit (dtype and shape included)."""
    for f in fields or FIELDS:
        g, w = got[f], want[f]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {f} is {g.dtype} {tuple(g.shape)}, " \
                                                          f"want {w.dtype} {tuple(w.shape)}"
        if not torch.equal(g, w):
            diff = (g != w).nonzero()
            raise AssertionError(f"{what}: {f} differs at {diff.shape[0]} places, first {diff[0].tolist()}")


def replayed_reply(engine, transcript, messages: list[dict], max_new_tokens: int) -> str:
    """The reply a session rebuilt from `transcript` must give: the transcript replayed into a
    fresh slot of `engine`, then the turn (greedy, generated here, not by the scheduler)."""
    from lessserve.workers.chat_session import plan_turn
    from lessserve.workers.reply import Reply

    slot = replay(engine, transcript.ids)
    try:
        plan = plan_turn(engine.tokenizer, transcript, messages)
        if plan.rebuild:
            engine.slab.reset(slot)
        gen = greedy(engine, slot, plan.new_ids, max_new_tokens)
        return "".join(Reply(engine.tokenizer, engine.stop_ids).pieces(gen))
    finally:
        engine.free(slot)
