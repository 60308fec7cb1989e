"""Calls with a deadline and a heartbeat. The call runs on a long-lived helper thread (so its
database connection is reused across steps, checked before each call and replaced if the server
dropped it); the calling thread waits and beats the heartbeat (renewing the run's lease) while
it runs. A call that overruns is abandoned with its thread, which gets replaced (``CallTimedOut``).
Python cannot kill a thread: the abandoned call may still be running, and the engine gives it a
grace period to end before its step may run again (see ``Context._execute``)."""

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import suppress
from typing import Any

from django.db import close_old_connections

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


class CallTimedOut(TimeoutError):
    """A call overran its deadline and was abandoned; it may still be running."""

    def __init__(self, message: str, future: Future):
        super().__init__(message)
        self.future = future

    def ended(self, *, grace: float, heartbeat: Callable[[], None] | None, every: float) -> bool:
        """Wait up to ``grace`` seconds (beating) for the abandoned call to end."""
        deadline = time.monotonic() + grace
        while not self.future.done() and time.monotonic() < deadline:
            with suppress(FutureTimeout, Exception):
                self.future.result(timeout=min(every, max(deadline - time.monotonic(), 0)))
            if heartbeat and not self.future.done():
                heartbeat()
        return self.future.done()


def _with_fresh_connections(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        close_old_connections()  # a connection the server dropped is replaced, not reused
        return fn()

    return call


def call_with_timeout(
    fn: Callable[[], Any],
    timeout: float,
    *,
    what: str,
    heartbeat: Callable[[], None] | None = None,
    every: float = 1.0,
) -> Any:
    """``fn()`` on the helper thread, waiting at most ``timeout`` seconds; while it runs,
    ``heartbeat()`` is called every ``every`` seconds on this thread."""
    pool = _pool()
    future = pool.submit(_with_fresh_connections(fn))
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            return future.result(timeout=max(min(remaining, every) if heartbeat else remaining, 0))
        except FutureTimeout:
            if time.monotonic() >= deadline:
                _abandon(pool)
                raise CallTimedOut(f"{what} timed out after {timeout:g}s", future) from None
            heartbeat()


def close_helper_connections() -> None:
    """Close the helper thread's database connections (at worker shutdown, after a test)."""
    from django.db import connections

    with _lock:
        pool = _executor
    if pool is not None:
        pool.submit(connections.close_all).result(timeout=10)
