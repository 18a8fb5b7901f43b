"""Per-session locks: arrival order, and no entry left once nobody holds or waits."""

import asyncio

from lessserve.cluster.worker import SessionLocks


def test_session_locks_serialise_and_clean_up():
    locks, order = SessionLocks(), []

    async def turn(name: str, sid: str, delay: float):
        async with locks.hold(sid):
            order.append(f"{name}+")
            await asyncio.sleep(delay)
            order.append(f"{name}-")

    async def main():
        a = asyncio.create_task(turn("a", "s1", 0.05))
        await asyncio.sleep(0)
        b = asyncio.create_task(turn("b", "s1", 0.0))  # waits behind a
        c = asyncio.create_task(turn("c", "s2", 0.03))  # another session: not blocked
        await asyncio.sleep(0.01)
        assert len(locks) == 2
        await asyncio.gather(a, b, c)

    asyncio.run(main())
    assert order.index("a-") < order.index("b+") and order.index("c-") < order.index("a-")
    assert len(locks) == 0
