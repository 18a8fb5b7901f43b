"""The one error tree: every error lessserve raises on purpose derives from `LessServeError`.

The categories below are what the boundaries map, each in one place: the router turns them into
HTTP statuses (`lessserve.cluster.http_errors`), the CLI into exit code 2 and one line
(`lessserve.cli.main`). Packages define their own errors as subclasses of a category (a cache
store error that means "a backend is down" is also a `DependencyUnavailableError`).

    LessServeError                      anything raised on purpose          HTTP   CLI
    |- ConfigError (ValueError)         a configuration / flag value is bad  400    exit 2, names the flag
    |- RequestError (ValueError)        a request cannot be served as asked  400    exit 2
    |- AuthError                        missing or invalid API key           401
    |- NotFoundError (KeyError)         a named thing does not exist         404    exit 2
    |- CapacityError                    no room now (slots, tiers, queue)    503 + Retry-After
    |- DependencyUnavailableError       a backend (Redis, an actor) is down  503 + Retry-After
    |- KernelError                      compute kernels (kernels/)           by its category
    `- CacheStoreError                  the session cache store (cache_store/errors.py)

This module is stdlib only and imports nothing of lessserve: every package may import it.
"""

from __future__ import annotations


class LessServeError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(LessServeError, ValueError):
    """A configuration value is invalid (policy, budget, weights file, a CLI flag, ...)."""


class RequestError(LessServeError, ValueError):
    """A request is well-formed but cannot be served as asked (too long, empty, ...)."""


class AuthError(LessServeError):
    """A request carries no API key, or one this server does not accept."""


class NotFoundError(LessServeError, KeyError):
    """A named thing (a model, a session, a file) does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class CapacityError(LessServeError):
    """No room right now (session slots, a full tier, a full queue): retrying later can succeed."""


class QuotaError(LessServeError):
    """An API key is over one of its quotas (cluster/quotas.py)."""


class DependencyUnavailableError(LessServeError):
    """A backend this service depends on (Redis, the cluster-state actor, a tool) is unreachable."""


class KernelError(LessServeError):
    """Base class of the compute kernels' errors (lessserve.kernels)."""


def category(e: BaseException) -> type[LessServeError] | None:
    """The first category of the tree that `e` belongs to (None for errors outside the tree)."""
    for cls in (AuthError, NotFoundError, RequestError, ConfigError, CapacityError, DependencyUnavailableError):
        if isinstance(e, cls):
            return cls
    return LessServeError if isinstance(e, LessServeError) else None


__all__ = [
    "AuthError", "CapacityError", "ConfigError", "DependencyUnavailableError", "KernelError", "LessServeError",
    "NotFoundError", "RequestError", "category",
]
