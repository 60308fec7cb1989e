import time

import pytest
from django.utils import timezone

from orchestration.engine.runner import run_advance
from orchestration.runs.models import Run
from tests.gates import ScriptedGate
from tests.orchestration.engine.puppet import Puppet


@pytest.fixture
def gate(settings):
    settings.BATON_GATE = "tests.gates.ScriptedGate"
    ScriptedGate.reset()
    yield ScriptedGate
    ScriptedGate.reset()


@pytest.fixture
def puppet(monkeypatch):
    """The compromised model, as the provider named ``puppet``."""
    return Puppet.install(monkeypatch)


def drive(run_id: int, *, rounds: int = 50, timers: bool = True) -> Run:
    """Advance a run in this process as a worker would, waiting out its timers, until it is
    final or waits for something other than a timer."""
    for _ in range(rounds):
        run_advance(run_id)
        run = Run.objects.get(pk=run_id)
        if run.is_final or (run.status == "waiting" and (run.wake_at is None or not timers)):
            return run
        if run.wake_at:
            time.sleep(max(0.0, (run.wake_at - timezone.now()).total_seconds()))
    raise AssertionError(f"run {run_id} did not settle in {rounds} rounds")
