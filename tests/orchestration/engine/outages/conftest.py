import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection, connections

from orchestration.engine import steps, timeouts
from orchestration.engine.timeouts import close_helper_connections
from orchestration.runs.models import Run
from tests.orchestration.engine.conftest import gate, puppet  # noqa: F401
from tests.orchestration.engine.outages import refusals, workflows


@pytest.fixture(autouse=True)
def _reset():
    workflows.reset()
    refusals.reset()
    yield
    workflows.RELEASE.set()


class Stops(list):
    """``stop_process`` calls: (monotonic time, worker, why, the run's lease owner then). Like
    ``os._exit``, nothing runs after it in the calling thread: it raises ``Died``."""

    def __call__(self, why: str) -> None:
        run_id = int(re.search(r"\brun (\d+)", why).group(1))
        owner = Run.objects.filter(pk=run_id).values_list("lease_owner", flat=True).first()
        self.append((time.monotonic(), threading.current_thread().name, why, owner))
        raise workflows.Died(why)


@pytest.fixture
def stops(monkeypatch):
    recorder = Stops()
    monkeypatch.setattr(steps, "stop_process", recorder)
    return recorder


@pytest.fixture
def worker_processes(monkeypatch):
    """Each thread of the test is a worker process of its own, with its own helper thread
    (named ``helper-of-<thread>``): calls of two workers do not queue behind each other."""
    pools: dict[int, ThreadPoolExecutor] = {}
    lock = threading.Lock()

    def pool() -> ThreadPoolExecutor:
        me = threading.current_thread()
        with lock:
            current = pools.get(me.ident)
            if current is None or current._shutdown:
                current = ThreadPoolExecutor(1, thread_name_prefix=f"helper-of-{me.name}")
                pools[me.ident] = current
            return current

    monkeypatch.setattr(timeouts, "_pool", pool)
    monkeypatch.setattr(timeouts, "_abandon", lambda p: p.shutdown(wait=False))
    yield
    workflows.RELEASE.set()
    for current in list(pools.values()):
        if not current._shutdown:
            current.submit(connections.close_all).result(timeout=30)
        current.shutdown(wait=True)


@pytest.fixture
def kept_connections(transactional_db, monkeypatch):
    """Connections kept between uses, as in production (``CONN_MAX_AGE`` 60)."""
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 60)
    connection.close()
    close_helper_connections()
    yield
    connection.close()
