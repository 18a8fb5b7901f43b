"""The one error tree: every lessserve error has a category the boundaries map, and the HTTP
table answers every known error with a non-500 status (503 with Retry-After when retrying helps)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import lessserve.errors.tree as E

PACKAGES = ["errors", "kernels", "cache_store", "workers", "cluster", "deploy", "lab", "evals", "training", "bench",
            "testing", "cli"]


def all_modules() -> list:
    mods = []
    for n in PACKAGES:
        pkg = importlib.import_module(f"lessserve.{n}")
        mods.append(pkg)
        for m in pkgutil.walk_packages(getattr(pkg, "__path__", []), f"lessserve.{n}."):
            if not m.name.startswith("lessserve.kernels.triton"):  # needs triton's interpreter or a GPU
                mods.append(importlib.import_module(m.name))
    return mods


def all_error_classes() -> list[type]:
    all_modules()
    seen, todo = [], [E.LessServeError]
    while todo:
        c = todo.pop()
        seen.append(c)
        todo += [s for s in c.__subclasses__() if s not in seen]
    return [c for c in seen if c.__module__.startswith("lessserve")]


def instance(cls: type) -> BaseException:
    from lessserve.bench.serve_load import TurnFailed
    from lessserve.cache_store.errors import RestoreError
    from lessserve.cli.flags import CliError
    from lessserve.cluster.http_errors import ApiError

    if issubclass(cls, RestoreError):
        return cls("s", "redis", E.DependencyUnavailableError("down"))
    if issubclass(cls, CliError):
        return cls("--flag", "bad")
    if issubclass(cls, TurnFailed):
        return cls(502, None, "bad gateway")
    if issubclass(cls, ApiError):
        return cls(409, "conflict")
    return cls("message")


def test_every_exception_class_in_the_package_derives_from_the_root():
    import inspect

    classes = {c for m in all_modules() for _, c in inspect.getmembers(m, inspect.isclass)}
    ours = [c for c in classes if issubclass(c, BaseException) and c.__module__.startswith("lessserve")]
    bad = sorted(f"{c.__module__}.{c.__name__}" for c in ours if not issubclass(c, E.LessServeError))
    assert not bad, bad


def test_the_tree_is_large_and_rooted():
    classes = all_error_classes()
    assert len(classes) > 25, [c.__name__ for c in classes]
    assert all(issubclass(c, E.LessServeError) for c in classes)


def test_every_known_error_answers_without_a_500():
    from lessserve.cluster.http_errors import http_error

    for cls in all_error_classes():
        h = http_error(instance(cls))
        assert h is not None and h.status != 500 and 400 <= h.status < 600, (cls, h)
        assert (h.retry_after is not None) == (h.status in (429, 503)), (cls, h)  # a retry later can succeed
        assert h.message, cls


@pytest.mark.parametrize("name,status,retry", [
    ("lessserve.cache_store.errors:TierFullError", 503, True),
    ("lessserve.cache_store.errors:TierUnavailableError", 503, True),
    ("lessserve.cache_store.errors:SessionPinnedError", 503, True),
    ("lessserve.workers.errors:SlotsExhaustedError", 503, True),
    ("lessserve.workers.errors:ContextOverflowError", 400, False),
    ("lessserve.workers.errors:LessWeightsMissingError", 400, False),
    ("lessserve.errors.tree:AuthError", 401, False),
    ("lessserve.cache_store.errors:CacheMissError", 404, False),
    ("lessserve.cluster.quotas:RateQuotaError", 429, True),
    ("lessserve.cluster.quotas:HardQuotaError", 403, False),
])
def test_categories_map_to_their_status(name, status, retry):
    from lessserve.cluster.http_errors import http_error

    mod, cls = name.split(":")
    h = http_error(getattr(importlib.import_module(mod), cls)("x"))
    assert h.status == status and (h.retry_after is not None) == retry


def test_a_worker_error_wrapped_by_ray_keeps_its_answer():
    """What reached clients as `500 internal error: RayTaskError(TierFullError)` maps to 503."""
    from ray.exceptions import RayTaskError

    from lessserve.cache_store.errors import TierFullError
    from lessserve.cluster.http_errors import http_error

    wrapped = RayTaskError("chat", "traceback", TierFullError("all 2 slots pinned")).as_instanceof_cause()
    h = http_error(wrapped)
    assert h.status == 503 and h.retry_after and "all 2 slots pinned" in h.message
    assert http_error(RuntimeError("a bug")) is None  # outside the tree: the router's 500


def test_errors_cross_ray_intact():
    """Errors with their own constructors survive pickling (Ray ships them between processes)."""
    import pickle

    from lessserve.cache_store.errors import RestoreError
    from lessserve.cluster.http_errors import ApiError

    r = pickle.loads(pickle.dumps(RestoreError("s", "redis", E.DependencyUnavailableError("down"))))
    assert (r.sid, r.tier, str(r.cause)) == ("s", "redis", "down")
    a = pickle.loads(pickle.dumps(ApiError(413, "too big", code="x", retry_after=3)))
    assert (a.status, str(a), a.code, a.retry_after) == (413, "too big", "x", 3)
