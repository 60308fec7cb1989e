"""After-commit broadcasts on channel-layer groups. Events carry names and ids only; consumers
re-read the database under the viewer's permissions. The layer is at-most-once, so a failed send
is logged and dropped: pages re-fetch their live fragments on every (re)connect.

Sending never blocks the caller: messages go to one event loop on a background thread, which
keeps the channel layer's connections open. An event goes out at once (its receivers are waiting
for it); the same event again within ``COALESCE_SECONDS`` of that send is held back and sent once
when the interval ends, however many times it was raised meanwhile (the receiver re-reads the
latest state anyway). So a burst costs at most two messages, and a steady stream one message
per interval."""

import asyncio
import logging
import os
import threading
from concurrent.futures import Future

from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

SYSTEM_GROUP = "system"
COALESCE_SECONDS = 0.05


class _Broadcaster:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0  # a forked worker process needs a loop (and thread) of its own
        self._pending: set[tuple[str, str, tuple]] = set()  # queued, not sent yet
        self._sent: dict[tuple[str, str, tuple], float] = {}  # key: its last send (loop time)
        self._inflight = 0

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="baton-broadcast", daemon=True
                )
                thread.start()
                self._loop, self._pid = loop, os.getpid()
                # what the parent had queued is on the parent's loop, not this one
                self._pending.clear()
                self._sent.clear()
                self._inflight = 0
            return self._loop

    def send(self, group: str, event_type: str, ids: dict) -> Future | None:
        key = (group, event_type, tuple(sorted(ids.items())))
        loop = self._ensure_loop()
        with self._lock:
            if key in self._pending:
                return None  # already on its way: one message carries the latest state
            self._pending.add(key)
            self._inflight += 1
        return asyncio.run_coroutine_threadsafe(self._send_soon(key), loop)

    async def _send_soon(self, key: tuple[str, str, tuple]) -> None:
        group, event_type, ids = key
        loop = asyncio.get_running_loop()
        try:
            last = self._sent.get(key)
            if last is not None and last + COALESCE_SECONDS > loop.time():
                # sent moments ago: once more at the end of the interval, for all raised by then
                await asyncio.sleep(last + COALESCE_SECONDS - loop.time())
            with self._lock:
                self._pending.discard(key)
            sent = self._sent[key] = loop.time()
            loop.call_later(COALESCE_SECONDS, self._forget, key, sent)
            layer = get_channel_layer()
            if layer is not None:
                await layer.group_send(group, {"type": event_type, **dict(ids)})
        except Exception as exc:  # the database, not the broadcast, is the record
            log.warning("broadcast to %s failed: %s", group, exc)
        finally:
            with self._lock:
                self._inflight -= 1

    def _forget(self, key: tuple[str, str, tuple], sent: float) -> None:
        """The interval after a send is over: the next event goes out at once (and the map of
        recent sends stays as small as the set of events of the last interval)."""
        if self._sent.get(key) == sent:
            del self._sent[key]

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything sent so far has gone out (for tests and shutdown)."""
        if self._loop is None or self._pid != os.getpid():
            return

        async def drain() -> None:
            while self._inflight:
                await asyncio.sleep(COALESCE_SECONDS / 5)

        asyncio.run_coroutine_threadsafe(drain(), self._loop).result(timeout)


_broadcaster = _Broadcaster()


def broadcast(group: str, event_type: str, **ids: int | str) -> None:
    _broadcaster.send(group, event_type, ids)


def broadcast_flush(timeout: float = 5.0) -> None:
    _broadcaster.flush(timeout)


def broadcast_system_status() -> None:
    broadcast(SYSTEM_GROUP, "system.status")
