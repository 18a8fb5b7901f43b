"""ActorKV: the key-value conformance suite (tests/cache_store/test_kv_conformance.py) over the real
cluster-state actor in a local Ray, and its deadline and error mapping without Ray."""

from __future__ import annotations

import asyncio
import time

import pytest

from lessserve.cache_store.errors import TierUnavailableError
from lessserve.cache_store.kv import KVMap
from lessserve.cluster.actor_kv import ActorKV
from tests.cache_store.test_kv_conformance import (  # noqa: F401 - collected here, over ActorKV
    ns,
    run,
    test_compare_and_set_writes_only_over_what_it_read,
    test_epoch_is_stable_while_the_backend_lives,
    test_keys_by_prefix_and_suffix_bounded_and_literal,
    test_large_values_and_concurrent_callers,
    test_many_at_once_keep_their_order,
    test_set_get_exists_delete,
    test_swap_and_pop_return_the_previous_value,
    test_ttls_expire_and_a_plain_set_clears_them,
    test_used_counts_keys_and_value_bytes,
)


@pytest.fixture(scope="module")
def state():
    import ray

    from lessserve.cluster.state import get_state

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING", namespace="lessserve", _node_ip_address="127.0.0.1")
    yield get_state()
    if started:
        ray.shutdown()


@pytest.fixture
def make_kv(state):
    def make():
        return ActorKV(state, timeout_s=30.0)

    make.kind = "cluster"
    return make


def test_the_actor_caps_a_prefix_and_names_the_tier(make_kv, ns):  # noqa: F811 - ns is the imported fixture
    async def body(kv: ActorKV):
        assert kv.name == "cluster"
        for i in range(5):
            await kv.set(f"{ns}r:{i}", b"x", ttl_s=60)
        await kv.cap(ns + "r:", 2)
        await kv.set(ns + "r:5", b"x")
        assert sorted(await kv.keys(ns + "r:")) == [f"{ns}r:4", f"{ns}r:5"]

    run(make_kv, body)


# --- without Ray: the deadline and the one error ------------------------------------------------
class Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakeState:
    """An actor handle lookalike: `kv_*` methods over a KVMap, or hung, or dead."""

    def __init__(self, mode: str = "ok"):
        self.map, self.mode = KVMap(), mode

    def __getattr__(self, name):
        async def call(*args):
            if self.mode == "hung":
                await asyncio.Event().wait()
            if self.mode == "dead":
                raise RuntimeError("The actor died unexpectedly before finishing this task.")
            op = getattr(self.map, name.removeprefix("kv_"))
            return op(*args[0]) if name == "kv_delete" else (self.map.epoch if name == "kv_epoch" else op(*args))

        return Method(call)


@pytest.mark.parametrize("mode", ["hung", "dead"])
def test_a_hung_or_dead_actor_fails_every_call_typed_within_the_deadline(mode):
    async def main():
        kv = ActorKV(FakeState(mode), timeout_s=0.2)
        calls = [kv.get("a"), kv.get_many(["a"]), kv.set("a", b"1"), kv.set_many({"a": b"1"}), kv.swap("a", b"1"),
                 kv.pop("a"), kv.delete("a"), kv.exists("a"), kv.keys("a"), kv.epoch(), kv.used(), kv.cap("a", 1)]
        for call in calls:
            t0 = time.monotonic()
            with pytest.raises(TierUnavailableError, match="no answer within 0.2 s" if mode == "hung" else "died"):
                await call
            assert time.monotonic() - t0 < 1.0

    asyncio.run(main())


def test_values_cross_as_bytes_and_empty_calls_stay_local():
    async def main():
        st = FakeState()
        kv = ActorKV(st, timeout_s=1.0)
        await kv.set_many({"a": memoryview(b"xy"), "b": "z"})
        assert st.map.get("a") == b"xy" and st.map.get("b") == b"z"
        st.mode = "dead"  # nothing to send: no call
        assert await kv.get_many([]) == [] and await kv.delete() == 0
        await kv.set_many({})

    asyncio.run(main())
