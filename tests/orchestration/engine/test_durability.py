"""Durability with real components: Redis, real Celery worker processes (solo pool, with beat
embedded by ``--beat`` running the reaper ``sweep_runs`` every second), and the real test
database (PostgreSQL when DATABASE_URL is set, else a SQLite file both processes share).

The workers load the test workflows with Celery's own ``--include`` option. They are killed
with SIGKILL on their whole process group (the worker and its embedded beat), as the kernel's
OOM killer or a lost machine would.
"""

import re
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from config.celery import app
from config.settings import celery_broker_url
from orchestration.demo.models import InfraChange
from orchestration.ledger.chain import ledger_verify
from orchestration.ledger.models import AuditRecord
from orchestration.runs.models import FINAL, Run, RunStatus, Step
from orchestration.runs.services import run_halt, run_start
from orchestration.tasks import LOST_ENQUEUE_SECONDS, advance_run
from tests.orchestration.engine import durability_workflows
from tests.orchestration.engine.durability_workflows import KIND, PAUSE_ENV, hit_file
from tests.services import Workers, producer_on, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

RUNS = 20
RECOVERY_SECONDS = 60  # every run is final this long after the last restart, at the latest
KEY_RE = re.compile(r"^run-(\d+)-step-(\d+)$")


# --- real workers ---------------------------------------------------------------------------


class DurabilityWorkers(Workers):
    """One worker at a time, with beat embedded, loading the test workflows. While ``pause``
    exists, the test tool pauses (see ``durability_workflows``)."""

    def __init__(self, redis_url: str, directory: Path):
        self.pause = directory / "pause"
        include = [durability_workflows.__name__]
        super().__init__(redis_url, directory, include=include, env={PAUSE_ENV: str(self.pause)})

    def start(self) -> None:
        super().start(beat=True)

    def stop_all(self) -> None:
        self.pause.unlink(missing_ok=True)  # a paused tool returns, so warm shutdown is quick
        super().stop_all()


@pytest.fixture
def workers(transactional_db, redis_client, redis_url, tmp_path):
    """Start workers with ``workers.start()``; all are stopped (and their groups killed) at the
    end. ``redis_client`` empties Redis first, so no message of an earlier test is delivered."""
    pool = DurabilityWorkers(redis_url, tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture
def producer_on_redis(redis_url):
    """Point this process's Celery producer at the real Redis (the unit tests' is memory://),
    so that ``run_start``'s enqueue after commit reaches the worker. Restored afterwards."""
    with producer_on(redis_url):
        assert app.connection_for_write().transport_cls.startswith("redis")
        yield


def send_advance(redis_url: str, run_id: int) -> str:
    """Send an ``advance_run`` message to the real broker; returns its task id."""
    task_id = uuid.uuid4().hex
    with app.connection_for_write(celery_broker_url(redis_url)) as conn:
        advance_run.apply_async(args=[run_id], task_id=task_id, connection=conn)
    return task_id


def task_result(log: str, task_id: str) -> str | None:
    """What the worker logged as the task's return value, once it has run it."""
    match = re.search(rf"\[{task_id}\] succeeded in [0-9.e-]+s: '(\w+)'", log)
    return match.group(1) if match else None


def expire_leases() -> int:
    """The killed worker's lease would keep its run unclaimable for ``LEASE_SECONDS`` (60 s), a
    module constant of the engine that no setting overrides and monkeypatch cannot reach in the
    worker process. Instead of waiting that long, move the expiry into the past, which is
    exactly what the passage of time does; the reaper then finds the run. Only done after the
    worker is dead (SIGKILLed and waited for), so no live worker's lease is taken away."""
    now = timezone.now()
    return (
        Run.objects.exclude(status__in=FINAL)
        .filter(lease_expires_at__gt=now)
        .update(lease_expires_at=now - timedelta(seconds=1))
    )


def effects(prefix: str = "") -> int:
    return InfraChange.objects.filter(kind=KIND, target__startswith=prefix).count()


# --- 1. crash recovery ------------------------------------------------------------------------


def test_runs_survive_sigkilled_workers_with_every_effect_made_once(workers, producer_on_redis):
    timings: dict[str, float] = {}
    began = time.monotonic()
    with workers.explain_failure():
        workers.start()
        timings["first worker ready"] = time.monotonic() - began
        prefix = f"crash-{uuid.uuid4().hex[:8]}"
        tags = [f"{prefix}-{i:02}" for i in range(RUNS)]
        run_ids = [run_start(workflow="durability.steps", input={"tag": tag}).pk for tag in tags]

        # Kill 1: anywhere, once the first few effects exist.
        wait_for(lambda: effects(prefix) >= 5, timeout=20, what="5 effects")
        workers.kill()
        kills = [effects(prefix)]
        expire_leases()
        workers.start()

        # Kill 2: after a tool's insert has committed, before its step is marked finished.
        workers.pause.touch()
        hit = hit_file(workers.pause)
        key = wait_for(lambda: hit.exists() and hit.read_text(), timeout=20, what="a pause")
        paused_run, paused_seq = map(int, KEY_RE.match(key).groups())
        paused = Step.objects.get(run_id=paused_run, seq=paused_seq)
        assert InfraChange.objects.filter(idempotency_key=key).count() == 1  # committed
        assert paused.status == "started"  # not finished
        workers.kill()
        kills.append(effects(prefix))
        workers.pause.unlink()
        hit.unlink()
        expire_leases()
        workers.start()

        # Kill 3: anywhere again, a few effects later.
        wait_for(lambda: effects(prefix) >= kills[-1] + 8, timeout=20, what="8 more effects")
        workers.kill()
        kills.append(effects(prefix))
        expire_leases()
        restarted = time.monotonic()
        workers.start()
        timings["last restart ready"] = time.monotonic() - restarted

        def all_final() -> bool:
            return not Run.objects.filter(pk__in=run_ids).exclude(status__in=FINAL).exists()

        wait_for(all_final, timeout=RECOVERY_SECONDS, what=f"all {RUNS} runs to be final")
        timings["all final after last restart"] = time.monotonic() - restarted

        assert len(kills) >= 3 and kills[-1] < 3 * RUNS, kills  # the kills hit work in flight
        runs = {run.pk: run for run in Run.objects.filter(pk__in=run_ids)}
        assert {run.status for run in runs.values()} == {RunStatus.COMPLETED}
        for run_id, tag in zip(run_ids, tags, strict=True):
            run = runs[run_id]
            steps = list(run.step_set.order_by("seq"))
            assert [(s.seq, s.kind, s.status) for s in steps] == [
                (1, "tool", "completed"),
                (2, "tool", "completed"),
                (3, "check", "completed"),
                (4, "tool", "completed"),
            ], run_id
            changes = []
            for step, suffix in zip((steps[0], steps[1], steps[3]), "abc", strict=True):
                # Counted by target, which is not unique: a re-executed step that made its
                # effect again (under any key) would show up here as a second row.
                rows = list(InfraChange.objects.filter(kind=KIND, target=f"{tag}/{suffix}"))
                assert len(rows) == 1, (run_id, suffix, rows)
                assert rows[0].idempotency_key == f"run-{run_id}-step-{step.seq}"
                assert step.output["change_id"] == rows[0].pk
                changes.append(rows[0].pk)
            assert run.result == {"changes": changes}
        assert effects(prefix) == 3 * RUNS

        # The step killed after its effect committed was re-executed (attempt 2), and its
        # second execution found the first one's row instead of making another.
        again = Step.objects.get(run_id=paused_run, seq=paused_seq)
        assert again.attempt == paused.attempt + 1
        assert again.output["change_id"] == InfraChange.objects.get(idempotency_key=key).pk
        assert Step.objects.filter(run_id__in=run_ids, attempt__gt=1).exists()

        audit = AuditRecord.objects.filter(run_id__in=run_ids)
        assert audit.filter(verb="run.started").count() == RUNS
        assert audit.filter(verb="run.completed").count() == RUNS
        verified = ledger_verify()
        assert verified.ok, verified

    timings["total"] = time.monotonic() - began
    print(f"kills at effects {kills}; paused {key} (attempt {paused.attempt}); ", timings)


# --- 2. lost enqueue ----------------------------------------------------------------------------


def test_a_run_whose_enqueue_was_lost_is_started_by_the_reaper(workers):
    began = time.monotonic()
    with workers.explain_failure():
        workers.start()
        tag = f"lost-{uuid.uuid4().hex[:8]}"
        # This process's producer is memory:// (tests.settings): run_start commits the run and
        # its advance_run message goes nowhere the worker listens, as if Redis had lost it.
        run = run_start(workflow="durability.steps", input={"tag": tag})
        created = time.monotonic()
        time.sleep(LOST_ENQUEUE_SECONDS / 2)
        assert Run.objects.get(pk=run.pk).status == RunStatus.PENDING  # nobody was told
        assert not Step.objects.filter(run=run).exists()

        wait_for(
            lambda: Run.objects.get(pk=run.pk).is_final,
            timeout=LOST_ENQUEUE_SECONDS + 15,
            what="the reaper to start the run and the run to finish",
        )
        took = time.monotonic() - created
        run.refresh_from_db()
        assert run.status == RunStatus.COMPLETED, run.error
        # Started by beat's sweep, which waits until a pending run is this old.
        assert run.started_at - run.created_at >= timedelta(seconds=LOST_ENQUEUE_SECONDS)
        for suffix in "abc":
            assert InfraChange.objects.filter(kind=KIND, target=f"{tag}/{suffix}").count() == 1
        assert ledger_verify().ok
    print(f"completed {took:.1f}s after creation; test took {time.monotonic() - began:.1f}s")


# --- 3. halt ------------------------------------------------------------------------------------


def test_a_halted_run_starts_no_further_step_on_a_real_worker(
    workers, producer_on_redis, redis_url
):
    began = time.monotonic()
    with workers.explain_failure():
        workers.start()
        sleeper_tag = f"sleeper-{uuid.uuid4().hex[:8]}"
        busy_tag = f"busy-{uuid.uuid4().hex[:8]}"

        # A: halted while it sleeps durably. The sleep is short so that its timer comes due
        # during the test: beat's sweep (every second) would wake a run that was not halted.
        sleeper = run_start(workflow="durability.sleeps", input={"tag": sleeper_tag, "seconds": 3})
        wait_for(
            lambda: Run.objects.get(pk=sleeper.pk).status == RunStatus.WAITING,
            timeout=15,
            what="the sleeper to wait",
        )
        wake_at = Run.objects.get(pk=sleeper.pk).wake_at
        assert wake_at is not None
        run_halt(run=sleeper.pk, by="reviewer-ann", reason="stop the sleeper")

        # B: halted while the worker is inside a tool call; the call cannot be recalled, but
        # once it returns no further step starts.
        workers.pause.touch()
        busy = run_start(workflow="durability.steps", input={"tag": busy_tag})
        hit = hit_file(workers.pause)
        key = wait_for(lambda: hit.exists() and hit.read_text(), timeout=15, what="a pause")
        assert key == f"run-{busy.pk}-step-1"
        run_halt(run=busy.pk, by="reviewer-ann", reason="wrong customer")
        workers.pause.unlink()  # the tool call in flight returns now

        # Past the sleeper's timer, with beat sweeping all the while.
        wait_for(
            lambda: timezone.now() > wake_at + timedelta(seconds=2.5),
            timeout=20,
            what="the sleeper's timer to be due",
        )
        # Stale messages for both runs: the solo worker runs them after whatever it was doing,
        # so once they are logged, it has finished with both runs.
        stale = [send_advance(redis_url, run_id) for run_id in (sleeper.pk, busy.pk)]
        results = wait_for(
            lambda: (
                all(task_result(workers.log(), t) for t in stale)
                and [task_result(workers.log(), t) for t in stale]
            ),
            timeout=20,
            what="the worker to run the stale messages",
        )
        assert results == ["skipped", "skipped"]
        # The message that was advancing B when it was halted ended with the halt.
        assert re.search(r"advance_run\[[\w-]+\] succeeded in [0-9.e-]+s: 'stopped'", workers.log())

        sleeper.refresh_from_db()
        assert sleeper.status == RunStatus.HALTED
        assert effects(f"{sleeper_tag}/before") == 1
        assert effects(f"{sleeper_tag}/after") == 0
        assert [(s.seq, s.kind, s.status, s.error_type) for s in sleeper.step_set.all()] == [
            (1, "tool", "completed", ""),
            (2, "sleep", "failed", "Halted"),
        ]

        busy.refresh_from_db()
        assert busy.status == RunStatus.HALTED
        assert effects(f"{busy_tag}/a") == 1  # was already being made when the halt came
        assert effects(f"{busy_tag}/b") == 0
        assert effects(f"{busy_tag}/c") == 0
        assert [(s.seq, s.status) for s in busy.step_set.all()] == [(1, "completed")]

        for run in (sleeper, busy):
            assert not run.events.filter(kind__in=["run.completed", "run.failed"]).exists()
        assert ledger_verify().ok
    print(f"test took {time.monotonic() - began:.1f}s")
