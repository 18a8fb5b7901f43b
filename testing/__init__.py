"""lessserve.testing: fixtures for tests and benchmarks (a private redis-server, a synchronous
turn driver over a SessionStore). The serving code never imports it."""

from lessserve.testing.local_redis import LocalRedis, free_port  # noqa: E402
from lessserve.testing.sessions import adopt, forget_cache, run_turn, snapshot  # noqa: E402

__all__ = ["LocalRedis", "adopt", "forget_cache", "free_port", "run_turn", "snapshot"]
