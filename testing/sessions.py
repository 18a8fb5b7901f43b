"""Driving a SessionStore without a scheduler (tests, benchmarks): a whole turn through
Engine.generate over the store's one turn API, and inspection that the serving path never needs."""

from __future__ import annotations

from collections.abc import Iterator

from lessserve.cache_store.codec import read_header
from lessserve.workers.chat_session import ChatSession, stream_reply
from lessserve.workers.session_store import SessionStore, meta_transcript


def run_turn(ss: SessionStore, session_id: str, messages: list[dict], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
    """One assistant turn for the full message history; yields text pieces. open_turn / close_turn
    bracket the generation exactly as the worker's scheduler does (close_turn runs whatever happens)."""
    chat, new_ids = ss.open_turn(session_id, messages, max_new_tokens)
    gen: list[int] = []
    try:
        yield from stream_reply(chat, new_ids, gen, max_new_tokens, temperature, top_p, seed)
    finally:
        ss.close_turn(session_id, messages, gen)

def snapshot(ss: SessionStore, session_id: str) -> bytes:
    """The session's device cache, encoded (transcript inside), without moving it."""
    return bytes(ss.io.run(ss.device.get(session_id)))


def adopt(ss: SessionStore, session_id: str, blob: bytes) -> None:
    """Load an encoded cache (from `snapshot`, or another worker) into a device slot."""
    tr = meta_transcript(read_header(blob).meta)
    if session_id not in ss.device.slots:
        ss.io.run(ss.store.make_room())
    ss.io.run(ss.device.put(session_id, blob))
    ss.store.admit(session_id)
    ss.sessions[session_id] = ChatSession(ss.engine, slot=ss.device.slot_of(session_id), transcript=tr)


def forget_cache(ss: SessionStore, session_id: str) -> None:
    """Drop the session's cache in every tier but keep its transcript (the next turn recomputes)."""
    ss.io.run(ss.store.forget_cache(session_id))
