"""Calls with a deadline. The call runs on a long-lived helper thread (so its database
connection is reused across steps); a call that overruns is abandoned with its thread, which
gets replaced. Python cannot kill a thread: the abandoned call may still finish later, which is
why every tool takes an idempotency key."""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="baton-step")
        return _executor


def _abandon(pool: ThreadPoolExecutor) -> None:
    global _executor
    with _lock:
        if _executor is pool:
            _executor = None
    pool.shutdown(wait=False)


def call_with_timeout(fn: Callable[[], Any], timeout: float, *, what: str) -> Any:
    pool = _pool()
    future = pool.submit(fn)
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        _abandon(pool)
        raise TimeoutError(f"{what} timed out after {timeout:g}s") from None


def close_helper_connections() -> None:
    """Close the helper thread's database connections (at worker shutdown, after a test)."""
    from django.db import connections

    with _lock:
        pool = _executor
    if pool is not None:
        pool.submit(connections.close_all).result(timeout=10)
