"""Inspecting a LocalSessions store in tests and benchmarks: what the serving path never needs.
Each runs on the scheduler thread, like every slab operation."""

from __future__ import annotations

from lessserve.cache_store.codec import read_header
from lessserve.workers.chat_session import ChatSession
from lessserve.workers.local_sessions import LocalSessions
from lessserve.workers.session_store import meta_transcript


def snapshot(ss: LocalSessions, session_id: str) -> bytes:
    """The session's device cache, encoded (transcript inside), without moving it."""
    return ss.scheduler.call(lambda: bytes(ss.device.get(session_id)))


def adopt(ss: LocalSessions, session_id: str, blob: bytes) -> None:
    """Load an encoded cache (from `snapshot`, or another worker) into a device slot."""
    tr = meta_transcript(read_header(blob).meta)
    if not ss.scheduler.call(lambda: session_id in ss.device.slots):
        ss.run(ss.store.make_room())

    def load():
        ss.device.put(session_id, blob)
        ss.store.admit(session_id)
        ss.sessions[session_id] = ChatSession(ss.engine, slot=ss.device.slot_of(session_id), transcript=tr)

    ss.scheduler.call(load)


def forget_cache(ss: LocalSessions, session_id: str) -> None:
    """Drop the session's cache in every tier but keep its transcript (the next turn recomputes)."""
    ss.run(ss.store.forget_cache(session_id))
