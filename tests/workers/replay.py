"""Independent replays for exact checks: a transcript re-fed to a fresh engine slot through chunks
this module cuts itself (absolute multiples of prefill_chunk, docs/engine.md), and a slot's state
compared field by field, bit for bit."""

from __future__ import annotations

import torch

from lessserve.kernels.reference.pack import dequantize_int8_ref, quantize_int8_ref

FIELDS = ("k", "v", "pos", "score", "H", "z", "length", "seen")


def replay(engine, ids: list[int]) -> int:
    """A fresh slot of `engine` that consumed `ids` from position 0, chunk by chunk; returns the slot."""
    slot, chunk, off = engine.alloc(), engine.cfg.prefill_chunk, 0
    while off < len(ids):
        size = min(chunk - off % chunk, len(ids) - off)
        engine.forward([slot], torch.tensor([ids[off : off + size]]), last_only=True)
        off += size
    return slot


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


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """Every slot field equal bit for bit (dtype and shape included)."""
    for f in FIELDS:
        g, w = got[f], want[f]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {f} is {g.dtype} {tuple(g.shape)}, " \
                                                          f"want {w.dtype} {tuple(w.shape)}"
        if not torch.equal(g, w):
            diff = (g != w).nonzero()
            raise AssertionError(f"{what}: {f} differs at {diff.shape[0]} places, first {diff[0].tolist()}")


def replayed_reply(engine, transcript, messages: list[dict], max_new_tokens: int) -> str:
    """The reply a session rebuilt from `transcript` must give: the transcript replayed into a
    fresh slot of `engine`, then the turn (greedy)."""
    from lessserve.workers.chat_session import ChatSession, Transcript

    tr = Transcript.from_dict(transcript.to_dict())
    chat = ChatSession(engine, slot=replay(engine, tr.ids), transcript=tr)
    try:
        return "".join(chat.turn(messages, max_new_tokens))
    finally:
        chat.close()
