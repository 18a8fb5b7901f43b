"""The one table from errors to HTTP answers: status, OpenAI error type and code, Retry-After.

The router maps every error through `http_error`, whether it was raised in the router, reported
by a worker as an error event, or arrived wrapped in a Ray RayTaskError. A known error (any
LessServeError) never becomes a 500: what is not a client's mistake and not named below is a
503 with Retry-After, since a retry rebuilds the session from its transcript.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.exceptions import RayTaskError

from lessserve.cluster.quotas import RETRY_AFTER_S as QUOTA_RETRY_AFTER_S
from lessserve.cluster.quotas import HardQuotaError, RateQuotaError
from lessserve.errors.tree import (
    AuthError,
    CapacityError,
    ConfigError,
    DependencyUnavailableError,
    LessServeError,
    NotFoundError,
    RequestError,
)
from lessserve.workers.errors import ContextOverflowError

RETRY_AFTER_S = 2  # what a busy or degraded server asks a client to wait


class ApiError(LessServeError):
    """An HTTP error the router answers with as is (bad body, unknown model, over a limit...)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param, self.retry_after = status, type_, code, param, retry_after

    def __reduce__(self):
        return type(self), (self.status, str(self), self.type, self.code, self.param, self.retry_after)


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str
    code: str | None
    message: str
    param: str | None = None
    retry_after: int | None = None

    def api_error(self) -> ApiError:
        return ApiError(self.status, self.message, self.type, self.code, self.param, self.retry_after)


# most specific first: (class, status, type, code, retry)
TABLE: list[tuple[type[BaseException], int, str, str | None, bool]] = [
    (ContextOverflowError, 400, "invalid_request_error", "context_length_exceeded", False),
    (AuthError, 401, "authentication_error", "invalid_api_key", False),
    (RateQuotaError, 429, "rate_limit_error", "rate_limit_exceeded", True),
    (HardQuotaError, 403, "permission_error", "quota_exceeded", False),
    (NotFoundError, 404, "not_found_error", "not_found", False),
    (RequestError, 400, "invalid_request_error", None, False),
    (ConfigError, 400, "invalid_request_error", None, False),
    (CapacityError, 503, "server_busy", "capacity", True),
    (DependencyUnavailableError, 503, "service_unavailable", "dependency_unavailable", True),
    (LessServeError, 503, "service_unavailable", "session_unavailable", True),
]


def unwrap(e: BaseException) -> BaseException:
    """The error a Ray task raised, out of its RayTaskError wrapper(s)."""
    while isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), BaseException):
        e = e.cause
    return e


def http_error(e: BaseException) -> HttpError | None:
    """The answer to `e`; None for an error outside the tree (a bug: the caller answers 500)."""
    e = unwrap(e)
    if isinstance(e, ApiError):
        return HttpError(e.status, e.type, e.code, str(e), e.param, e.retry_after)
    for cls, status, type_, code, retry in TABLE:
        if isinstance(e, cls):
            wait = QUOTA_RETRY_AFTER_S if status == 429 else RETRY_AFTER_S
            return HttpError(status, type_, code, str(e), retry_after=wait if retry else None)
    return None
