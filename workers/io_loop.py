"""An asyncio event loop running in a daemon thread, for synchronous callers of async I/O.

`run(coro)` blocks the caller until the coroutine finishes on the loop's thread; it works from
plain code and from inside another running event loop alike (it never nests loops).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class IoLoop:
    def __init__(self, name: str = "lessserve-io"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()
