"""After-commit broadcasts: an event goes out at once; the same event raised again within
``COALESCE_SECONDS`` of a send goes out once more at the end of that interval, however many times
it was raised; other events are independent."""

import asyncio
import threading
import time

import pytest

from orchestration import broadcast as module


@pytest.fixture
def sent(monkeypatch):
    """The messages a fake channel layer got, with when; the interval made long enough to tell
    "at once" from "at the end of the interval" on a busy machine."""
    messages = []

    class Layer:
        async def group_send(self, group, message):
            messages.append((time.monotonic(), group, message))

    monkeypatch.setattr(module, "get_channel_layer", lambda: Layer())
    monkeypatch.setattr(module, "COALESCE_SECONDS", 0.5)
    return messages


def test_an_event_goes_out_at_once_and_a_burst_after_it_once_at_the_intervals_end(sent):
    broadcaster = module._Broadcaster()
    raised = time.monotonic()
    broadcaster.send("runs.7", "run.changed", {"run_id": 7})
    broadcaster.flush()
    assert len(sent) == 1 and sent[0][0] - raised < 0.25  # at once, not after the interval
    for _ in range(10):
        broadcaster.send("runs.7", "run.changed", {"run_id": 7})
    broadcaster.send("runs.8", "run.changed", {"run_id": 8})
    broadcaster.flush()

    seven = [(t, m) for t, group, m in sent if group == "runs.7"]
    assert [m for _, m in seven] == [{"type": "run.changed", "run_id": 7}] * 2
    assert seven[1][0] - seven[0][0] >= 0.45  # the burst: once, at the end of the interval
    eight = [t for t, group, _ in sent if group == "runs.8"]
    assert len(eight) == 1 and eight[0] < seven[1][0]  # another event is not held back


def test_a_burst_raised_before_the_first_send_goes_out_once(sent):
    broadcaster = module._Broadcaster()
    loop_busy, release = threading.Event(), threading.Event()

    async def hold_the_loop() -> None:  # the burst is raised while the loop cannot send yet
        loop_busy.set()
        release.wait()

    asyncio.run_coroutine_threadsafe(hold_the_loop(), broadcaster._ensure_loop())
    assert loop_busy.wait(5)
    for _ in range(10):
        broadcaster.send("approvals.queue", "queue.changed", {"request_id": 3})
    release.set()
    broadcaster.flush()
    assert [m for _, _, m in sent] == [{"type": "queue.changed", "request_id": 3}]


def test_after_a_quiet_interval_an_event_goes_out_at_once_again(sent):
    broadcaster = module._Broadcaster()
    broadcaster.send("approvals.queue", "queue.changed", {"request_id": 1})
    broadcaster.flush()
    time.sleep(0.6)
    raised = time.monotonic()
    broadcaster.send("approvals.queue", "queue.changed", {"request_id": 1})
    broadcaster.flush()
    assert len(sent) == 2 and sent[1][0] - raised < 0.25
    time.sleep(1.0)
    assert not broadcaster._sent  # nothing is kept about the events of past intervals
