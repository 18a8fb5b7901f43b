"""Backpressure and the directory's outage handling, as units (no Ray): the turn gate admits at
most `slots` turns, queues `depth` more for at most `max_wait_s`, refuses the rest with a
CapacityError; write-behind keeps failed directory writes and replays them; a re-publish never
overwrites an entry that records more turns."""

import asyncio

import pytest

from lessserve.cluster.admission import QueueFullError, QueueTimeoutError, TurnGate
from lessserve.cluster.directory import DirectoryUnavailableError, WriteBehind, merged_entry
from lessserve.cluster.http_errors import http_error


def test_gate_admits_queues_and_refuses():
    async def main():
        gate, log = TurnGate(slots=2, depth=1, max_wait_s=0.3), []

        async def turn(name, hold):
            async with gate.admit():
                log.append(("in", name, gate.running))
                await asyncio.sleep(hold)

        a, b = asyncio.create_task(turn("a", 0.2)), asyncio.create_task(turn("b", 0.2))
        await asyncio.sleep(0.01)
        c = asyncio.create_task(turn("c", 0.0))  # waits for a slot, gets one when a ends
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError) as full:
            await turn("d", 0)  # slots busy and the queue (depth 1) full
        await asyncio.gather(a, b, c)
        blockers = [asyncio.create_task(turn(x, 1.0)) for x in "ef"]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueTimeoutError) as late:
            await turn("g", 0)  # waits 0.3 s, no slot frees
        await asyncio.gather(*blockers)
        return gate, log, full.value, late.value

    gate, log, full, late = asyncio.run(main())
    assert [x[1] for x in log][:3] == ["a", "b", "c"] and max(x[2] for x in log) == 2
    st = gate.stats()
    assert st["rejected_total"] == 2 and st["waits_total"] == 2 and st["running"] == 0 and st["waiting"] == 0
    for e in (full, late):
        h = http_error(e)
        assert h.status == 503 and h.retry_after


def test_a_sessions_lock_wait_and_slot_wait_share_one_limit():
    """A turn waits for its session's previous turn, then for a slot: both within max_wait_s in all
    (a lock wait used to be unbounded and outside the gate's limit)."""
    from lessserve.cluster.admission import SessionBusyError
    from lessserve.cluster.worker import SessionLocks

    async def main():
        gate, locks = TurnGate(slots=1, depth=4, max_wait_s=0.3), SessionLocks()
        loop = asyncio.get_running_loop()

        async def turn(sid, hold):
            deadline = gate.deadline()
            async with locks.hold(sid, deadline), gate.admit(deadline):
                await asyncio.sleep(hold)

        first = asyncio.create_task(turn("s", 1.0))
        await asyncio.sleep(0.01)
        t0 = loop.time()
        with pytest.raises(SessionBusyError) as busy:
            await turn("s", 0)  # the same session: its previous turn runs past the limit
        waited_lock = loop.time() - t0
        t0 = loop.time()
        with pytest.raises(QueueTimeoutError):
            await turn("other", 0)  # another session: the slot stays busy past the limit
        waited_slot = loop.time() - t0
        await first
        second = asyncio.create_task(turn("s", 0.2))
        await asyncio.sleep(0.01)
        await turn("s", 0)  # a previous turn that ends in time: this one runs after it
        await second
        return busy.value, waited_lock, waited_slot, len(locks)

    busy, waited_lock, waited_slot, held = asyncio.run(main())
    assert 0.25 < waited_lock < 0.6 and 0.25 < waited_slot < 0.6 and held == 0
    h = http_error(busy)
    assert h.status == 503 and h.retry_after and "previous turn" in h.message


class FlakyDirectory:
    """A directory backend that is down until `up` is set (records what reached it)."""

    def __init__(self):
        self.up, self.entries = False, {}

    async def place(self, sid, worker=None, owner=None, turns=None, if_newer=False):
        if not self.up:
            raise DirectoryUnavailableError("down")
        self.entries[sid] = merged_entry(self.entries.get(sid), worker, owner, turns, if_newer)

    async def forget(self, sid):
        if not self.up:
            raise DirectoryUnavailableError("down")
        self.entries.pop(sid, None)


def test_write_behind_keeps_the_latest_write_per_session_and_replays_it():
    async def main():
        d = FlakyDirectory()
        wb = WriteBehind(d)
        await wb.place("s1", "w1", "o", 1)
        await wb.place("s1", "w2", "o", 2)  # the latest wins
        await wb.place("s2", "w1", "o", 1)
        await wb.forget("s2")
        assert await wb.flush() == 2  # still down: nothing replayed
        d.up = True
        assert await wb.flush() == 0
        return d, wb

    d, wb = asyncio.run(main())
    assert set(d.entries) == {"s1"} and d.entries["s1"]["worker"] == "w2" and d.entries["s1"]["turns"] == 2
    assert wb.failures == 4


def test_a_republish_never_overwrites_a_newer_entry():
    e = merged_entry(None, "w1", "o", 3, if_newer=True)
    assert e["worker"] == "w1" and e["turns"] == 3
    assert merged_entry(e, "w2", "o", 2, if_newer=True) is None  # w2 holds a stale copy
    assert merged_entry(e, "w2", "other", 4, if_newer=True)["owner"] == "o"  # the owner never changes
    assert merged_entry(e, "w2", "o", 1, if_newer=False)["worker"] == "w2"  # a served turn always claims
