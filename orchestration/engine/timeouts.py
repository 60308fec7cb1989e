"""Calls with a deadline and a heartbeat. The call runs on a long-lived helper thread (so its
database connection is reused across steps, checked before each call and replaced if the server
dropped it); the calling thread waits and beats the heartbeat (renewing the run's lease) while
it runs. A call that overruns is abandoned with its thread, which gets replaced (``CallAbandoned``).
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


_renewals: ThreadPoolExecutor | None = None


def renewal_thread() -> ThreadPoolExecutor:
    """The thread that renews leases while steps run (``LeaseKeeper``), apart from the waiting
    thread so that a slow renewal never delays the check of the lease's deadline."""
    global _renewals
    with _lock:
        if _renewals is None:
            _renewals = ThreadPoolExecutor(1, thread_name_prefix="baton-lease")
        return _renewals


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


class CallAbandoned(TimeoutError):
    """The waiting thread stopped waiting for a call (its deadline passed, or the task's time
    limit interrupted the wait) that may still be running."""

    def __init__(self, message: str, future: Future):
        super().__init__(message)
        self.future = future

    def ended(self, *, grace: float, keeper=None) -> bool:
        """Wait up to ``grace`` seconds (keeping the lease) for the abandoned call to end."""
        deadline = time.monotonic() + grace
        while not self.future.done() and time.monotonic() < deadline:
            wait = deadline - time.monotonic()
            with suppress(Exception):  # its outcome is not ours any more; only its end is
                self.future.result(timeout=max(min(wait, keeper.wait() if keeper else wait), 0))
            if keeper is not None and not self.future.done():
                keeper.tick()
        return self.future.done()


def _with_fresh_connections(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        close_old_connections()  # a connection the server dropped is replaced, not reused
        return fn()

    return call


def call_with_timeout(fn: Callable[[], Any], timeout: float, *, what: str, keeper=None) -> Any:
    """``fn()`` on the helper thread, waiting at most ``timeout`` seconds; while it runs the
    ``keeper`` (a ``LeaseKeeper``) ticks. Raises ``CallAbandoned`` if this thread stops waiting
    while the call runs on: its deadline passed, or anything was raised into this thread (a
    task's time limit, the keeper's own trouble) before the call ended."""
    pool = _pool()
    future = pool.submit(_with_fresh_connections(fn))
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        wait = min(remaining, keeper.wait()) if keeper is not None else remaining
        try:
            try:
                return future.result(timeout=max(wait, 0))
            except FutureTimeout:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{what} timed out after {timeout:g}s") from None
                if keeper is not None:
                    keeper.tick()
        except Exception as exc:
            if future.done() and exc is future.exception():
                raise  # the call's own error
            _abandon(pool)
            timed_out = isinstance(exc, TimeoutError)
            message = str(exc) if timed_out else f"{what} was abandoned: {type(exc).__name__}"
            raise CallAbandoned(message, future) from exc


def close_helper_connections() -> None:
    """Close the helper thread's database connections (at worker shutdown, after a test)."""
    from django.db import connections

    with _lock:
        pools = [pool for pool in (_executor, _renewals) if pool is not None]
    for pool in pools:
        pool.submit(connections.close_all).result(timeout=10)
