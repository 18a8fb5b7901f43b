"""ServeBackend (cluster/backend.py) over a fake deployment handle, without Ray running: a turn is
routed by its affinity, held back until committed, retried on another worker when its worker dies
before then, and a worker lost afterwards is a typed 503."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorUnavailableError, RayActorError

from lessserve.cluster.backend import ServeBackend
from lessserve.cluster.http_errors import ApiError
from lessserve.cluster.protocol import EndEvent, StartEvent, TokenEvent, TurnRequest
from lessserve.testing.fake_backend import MemoryMetrics

REQ = TurnRequest(session_id="~r-child", owner="o", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                  fork_from="~r-parent")
TURN = [StartEvent(3, 3), TokenEvent("a"), TokenEvent("b"), EndEvent("stop", 2)]


class FakeHandle:
    """`handle.options(...).chat.remote(req)`: each call plays the next script; an exception in a
    script is raised there, as Ray raises a dead replica's error from its stream."""

    def __init__(self, *scripts: list):
        self.scripts, self.options_seen, self.requests = list(scripts), [], []

    def options(self, **kw):
        self.options_seen.append(kw)
        return self

    @property
    def chat(self):
        return self

    def remote(self, req):
        self.requests.append(req)
        return self._play(self.scripts.pop(0))

    async def _play(self, script):
        for item in script:
            if isinstance(item, BaseException):
                raise item
            await asyncio.sleep(0)
            yield item


def run(handle: FakeHandle, stream: bool, retries: int = 2):
    metrics = MemoryMetrics()
    backend = ServeBackend(handle, retries, metrics, backoff_s=0)

    async def main():
        got = []
        try:
            async for ev in backend.turn(REQ, stream=stream):
                got.append(ev)
        except ApiError as e:
            return got, e, metrics
        return got, None, metrics

    return asyncio.run(main())


@pytest.mark.parametrize("stream", [False, True])
def test_a_worker_lost_before_the_first_token_is_replaced_unseen(stream):
    handle = FakeHandle([StartEvent(3, 3), RayActorError()], TURN)
    got, err, metrics = run(handle, stream)
    assert got == TURN and err is None and metrics.retries == 1
    assert handle.requests == [REQ, REQ]
    assert all(o == {"stream": True, "session_id": "~r-parent"} for o in handle.options_seen)  # the parent's worker


def test_a_whole_reply_is_retried_even_after_tokens_but_a_stream_is_not():
    died = [StartEvent(3, 3), TokenEvent("a"), ActorUnavailableError("gone", None)]
    got, err, metrics = run(FakeHandle(died, TURN), stream=False)
    assert got == TURN and err is None and metrics.retries == 1
    got, err, metrics = run(FakeHandle(died, TURN), stream=True)
    assert got == [StartEvent(3, 3), TokenEvent("a")] and metrics.retries == 0
    assert (err.status, err.code, err.retry_after) == (503, "worker_unavailable", 2)


def test_no_worker_left_is_503():
    got, err, metrics = run(FakeHandle([RayActorError()], [RayActorError()]), stream=True, retries=1)
    assert got == [] and err.status == 503 and "no worker could run the turn" in str(err) and metrics.retries == 1


def test_session_calls_follow_the_session_and_a_lost_worker_is_503():
    class Sessions:
        def __init__(self, fail: bool):
            self.fail, self.seen = fail, []

        def options(self, **kw):
            self.seen.append(kw)
            return self

        def __getattr__(self, name):
            outer = self

            class Method:
                async def remote(self, *args):
                    if outer.fail:
                        raise RayActorError()
                    return {"method": name, "args": args}

            return Method()

    ok = Sessions(False)
    backend = ServeBackend(ok, 0, MemoryMetrics())
    assert asyncio.run(backend.session_info("s", "o")) == {"method": "session_info", "args": ("s", "o")}
    assert asyncio.run(backend.delete_session("s", "o"))["method"] == "delete_session"
    assert ok.seen == [{"session_id": "s"}] * 2
    with pytest.raises(ApiError) as e:
        asyncio.run(ServeBackend(Sessions(True), 0, MemoryMetrics()).session_info("s", "o"))
    assert e.value.status == 503 and e.value.code == "worker_unavailable"
