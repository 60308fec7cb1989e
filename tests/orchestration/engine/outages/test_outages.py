"""The engine's durability promises under database outages, slow renewals and overruns, as a
chaos engineer attacked them: a crash costs at most the step in flight and nothing is repeated; a
database drop never fails a run; a query the database refuses is the step's failure, never an
endless retry; a step longer than the lease never executes twice at the same time. Task bodies
(``run_advance``, ``sweep_runs``) are driven directly, as in ``test_fault_windows.py``."""

import signal
import threading
import time
from contextlib import suppress

import pytest
from django.db import connection
from django.utils import timezone

from orchestration.demo.models import InfraChange
from orchestration.engine import context, faults, steps
from orchestration.engine.runner import run_advance
from orchestration.runs.models import Run, Step
from orchestration.runs.services import run_halt, run_start
from orchestration.tasks import sweep_runs
from tests.orchestration.engine.outages import workflows
from tests.orchestration.engine.outages.helpers import admin_connection, describe, expire_lease
from tests.orchestration.engine.outages.workflows import CALLS, JOURNAL, OUTAGE, PLANS, Died

pytestmark = pytest.mark.django_db(transaction=True)


# --- helpers ----------------------------------------------------------------------------------


def terminate(pids: list[int] | None = None) -> None:
    """End the test database's sessions (``pids``, or all), as a failover does."""
    query = (
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    with admin_connection() as admin:
        if pids is None:
            admin.execute(query).fetchall()
        else:
            admin.execute(query + " AND pid = ANY(%s)", [pids]).fetchall()


def make_due(run_id: int) -> None:
    Run.objects.filter(pk=run_id).update(wake_at=timezone.now())


def advance_until_settled(run_id: int, *, rounds: int) -> list[str]:
    """Advance as workers would, making a run due later due at once, and reviving a run whose
    worker died (its lease expiring); stop once it is final or waits for a person."""
    outcomes = []
    for _ in range(rounds):
        try:
            outcomes.append(run_advance(run_id))
        except Died:
            outcomes.append("died")
            # In production the process is gone with its call; here the call's thread ends by
            # itself. The lease expires meanwhile.
            deadline = time.monotonic() + 10
            while any(e["ended"] is None for e in JOURNAL) and time.monotonic() < deadline:
                time.sleep(0.02)
            expire_lease(run_id)
        run = Run.objects.get(pk=run_id)
        if run.is_final or (run.status == "waiting" and run.wake_at is None):
            break
        if run.wake_at and run.wake_at > timezone.now():
            make_due(run_id)
    return outcomes


def effects(label: str) -> int:
    return InfraChange.objects.filter(target=label).count()


# --- 1. an OperationalError that is not an outage --------------------------------------------


def test_a_step_whose_query_the_database_always_refuses_does_not_loop_forever(gate):
    """A tool's query that exceeds the statement timeout (PostgreSQL: QueryCanceled) or names a
    missing table (SQLite) raises OperationalError every time. It is the tool's failure, not an
    outage: the tool policy's three attempts bound it and the run fails, saying why."""
    run = run_start(workflow="outage.one", input={"tool": "outage.report", "label": "report"})
    outcomes = advance_until_settled(run.pk, rounds=10)
    run = Run.objects.get(pk=run.pk)
    assert run.is_final, (
        f"after {len(outcomes)} slices ({outcomes}) the run is still not decided; the tool "
        f"executed {CALLS['report']} times; {describe(run.pk)}"
    )


def test_workflow_code_whose_query_the_database_always_refuses_does_not_loop_forever(gate):
    run = run_start(workflow="outage.raw_sql", input={"label": "raw"})
    outcomes = advance_until_settled(run.pk, rounds=10)
    run = Run.objects.get(pk=run.pk)
    assert run.is_final, (
        f"after {len(outcomes)} slices ({outcomes}) the run is still not decided; "
        f"{describe(run.pk)}"
    )


# --- 2. a drop after the outbox was applied, before its transaction commits --------------------


@pytest.mark.postgres
@pytest.mark.parametrize("window", ["next_step_start", "finish"])
def test_a_drop_after_the_outbox_is_applied_does_not_re_execute_a_finished_step(
    gate, kept_connections, window
):
    """The outbox is cleared as soon as it is applied, inside a transaction that may still roll
    back. When the connection drops later in that transaction (the next step's start, or the
    run's end), ``_interrupted`` finds it empty and records nothing: a step whose call returned
    runs again, as if the worker had been SIGKILLed, although the database came straight back."""
    label = f"outbox-{window}"
    run = run_start(workflow="outage.two", input={"label": label})
    inserts: list[str] = []
    fired: list[str] = []

    def drop_connection_here(execute, sql, params, many, context_):
        if sql.startswith('INSERT INTO "orchestration_step"'):
            inserts.append(sql)
        if window == "next_step_start":
            here = len(inserts) == 2 and sql.startswith('INSERT INTO "orchestration_step"')
        else:
            here = sql.startswith('UPDATE "orchestration_run"') and '"finished_at"' in sql
        if here and not fired:
            fired.append(sql)
            terminate([context_["connection"].connection.info.backend_pid])
        return execute(sql, params, many, context_)

    with connection.execute_wrapper(drop_connection_here):
        assert run_advance(run.pk) == "interrupted"
    assert fired
    advance_until_settled(run.pk, rounds=10)
    run = Run.objects.get(pk=run.pk)
    assert run.status == "completed", describe(run.pk)
    assert effects(f"{label}-1") == effects(f"{label}-2") == 1
    finished = f"{label}-1" if window == "next_step_start" else f"{label}-2"
    assert CALLS[finished] == 1, (
        f"the finished step {finished} executed {CALLS[finished]} times; {describe(run.pk)}"
    )


# --- 3. a halt racing an interrupted slice ---------------------------------------------------


def _halt_after_the_first_effect(run_id: int, *, then_drop: bool) -> None:
    def hook(name: str, at_run: int) -> None:
        if name == faults.EXECUTED and at_run == run_id and not fired:
            fired.append(name)
            run_halt(run=run_id, by="reviewer-ann", reason="stop it")
            if then_drop:
                terminate()  # the database restarts just after the halt committed

    fired: list[str] = []
    remove = faults.install(hook)
    try:
        run_advance(run_id)
    finally:
        remove()
    assert fired


@pytest.mark.postgres
def test_control_a_halt_keeps_the_record_of_an_effect_already_made(gate, kept_connections):
    run = run_start(workflow="outage.two", input={"label": "halt-only"})
    _halt_after_the_first_effect(run.pk, then_drop=False)
    assert effects("halt-only-1") == 1
    assert Step.objects.get(run_id=run.pk, seq=1).status == "completed", describe(run.pk)


@pytest.mark.postgres
def test_a_halt_then_a_drop_keeps_the_record_of_an_effect_already_made(gate, kept_connections):
    """``_finish`` and the ``Halted`` path record what ran before a halt; ``_interrupted`` only
    records it for a run that is not final, so on a halted run an executed action is left
    ``started`` (no output, no tool.completed event) although its effect was made."""
    run = run_start(workflow="outage.two", input={"label": "halt-drop"})
    _halt_after_the_first_effect(run.pk, then_drop=True)
    assert Run.objects.get(pk=run.pk).status == "halted"
    assert effects("halt-drop-1") == 1
    step = Step.objects.get(run_id=run.pk, seq=1)
    assert step.status == "completed", describe(run.pk)


# --- 4. the database back after a second: what the slice finished -------------------------------


@pytest.mark.postgres
def test_a_short_outage_does_not_re_execute_a_step_that_finished_before_it(gate, kept_connections):
    """The database refuses connections for a moment (a restart) right after a step's call
    returned. ``_interrupted`` tries to record the slice once, at once, fails, and drops the
    outbox: the finished step executes again later."""
    name = connection.settings_dict["NAME"]
    run = run_start(workflow="outage.two", input={"label": "restart"})
    with admin_connection("postgres") as admin:

        def restart(name_: str, at_run: int) -> None:
            if name_ == faults.EXECUTED and at_run == run.pk and not fired:
                fired.append(time.monotonic())
                admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
                terminate_all = (
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()"
                )
                admin.execute(terminate_all, [name]).fetchall()
                import threading

                def back():
                    with admin_connection("postgres") as again:
                        again.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')

                threading.Timer(0.3, back).start()

        fired: list[float] = []
        remove = faults.install(restart)
        try:
            assert run_advance(run.pk) == "interrupted"
        finally:
            remove()
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        down = time.monotonic() - fired[0]
    assert down < 5  # a restart of a few seconds at most
    advance_until_settled(run.pk, rounds=10)
    run = Run.objects.get(pk=run.pk)
    assert run.status == "completed", describe(run.pk)
    assert CALLS["restart-1"] == 1, (
        f"step 1 finished before the outage ({down:.2f} s) and executed {CALLS['restart-1']} "
        f"times; {describe(run.pk)}"
    )


# --- 5. self-stops during an outage use up a step's retries -----------------------------------


def test_workers_stopped_by_a_database_outage_do_not_use_up_a_step_s_retries(
    gate, settings, stops, monkeypatch
):
    """Twice the database refuses a long step's lease renewals until the lease may have
    expired: the LeaseKeeper stops the worker (the promise's own safety valve). Those are
    infrastructure faults, yet each costs an attempt: the service's first real failure then
    finds the tool policy's three attempts used up, and the run fails."""
    settings.BATON_LEASE_SECONDS = 1
    monkeypatch.setattr(steps, "lease_expiry", workflows.refusing_lease_expiry)
    PLANS["outage"] = ["outage", "outage", "fail", "ok"]
    run = run_start(
        workflow="outage.one", input={"tool": "outage.planned", "label": "outage", "seconds": 1.5}
    )
    outcomes = advance_until_settled(run.pk, rounds=12)
    assert len(stops) == 2 and all("could not renew the lease" in s[2] for s in stops), stops
    assert OUTAGE["refused"] >= 4
    run = Run.objects.get(pk=run.pk)
    assert run.status == "completed", f"{outcomes}; {describe(run.pk)}"


# --- 6. an overrunning call: stop before the lease is given back, and bounded ----------------


def test_a_call_that_always_overruns_is_stopped_holding_the_lease_and_is_bounded(
    gate, stops, monkeypatch
):
    monkeypatch.setattr(context, "OVERRUN_GRACE_SECONDS", 0.4)
    run = run_start(
        workflow="outage.one", input={"tool": "outage.overrun", "label": "overrun", "seconds": 8}
    )
    outcomes = []
    for _ in range(12):
        try:
            outcome = run_advance(run.pk)
        except Died:
            outcome = "stopped"
            step = Step.objects.get(run_id=run.pk, seq=1)
            held = Run.objects.get(pk=run.pk)
            # Stopped after its attempt was recorded and before its lease was given back.
            assert step.attempt == len(stops) and step.status in {"retrying", "failed"}
            assert held.lease_owner and held.lease_expires_at > timezone.now()
            assert stops[-1][3] == held.lease_owner  # owned when stop_process was reached
            expire_lease(run.pk)
        outcomes.append(outcome)
        if Run.objects.get(pk=run.pk).is_final:
            break
        make_due(run.pk)
    run = Run.objects.get(pk=run.pk)
    assert outcomes.count("stopped") == 3 and outcomes[-1] == "failed", (
        f"{outcomes}; {describe(run.pk)}"
    )
    assert run.status == "failed" and "timed out" in run.error


# --- 7. a renewal that is slow or hangs: another worker takes the run mid-step -------------------


@pytest.mark.parametrize("latency", [0.6, 2.0], ids=["slow-renewal", "hung-renewal"])
def test_a_slow_or_hung_lease_renewal_never_lets_a_step_execute_twice_at_once(
    gate, settings, stops, worker_processes, monkeypatch, latency
):
    """Worker A executes a 3 s step under a 1 s lease; its renewals take ``latency`` to reach
    the database (a congested link, a half-open TCP connection) but the worker is alive. Worker
    B sweeps and claims as soon as it may. The LeaseKeeper checks its deadline only when a
    renewal query returns, and stops A only then: B may already be executing the step."""
    settings.BATON_LEASE_SECONDS = 1
    original = steps.lease_expiry

    def lease_expiry(now):
        a_executing = any(e["worker"] == "MainThread" and e["ended"] is None for e in JOURNAL)
        if threading.current_thread() is threading.main_thread() and a_executing:
            time.sleep(latency)  # the renewal's query, on its way to the server
        return original(now)

    monkeypatch.setattr(steps, "lease_expiry", lease_expiry)
    run = run_start(
        workflow="outage.one", input={"tool": "outage.slow", "label": "renewal", "seconds": 3}
    )
    done = threading.Event()
    seen: list[tuple[float, str, int]] = []

    def worker_b() -> None:
        from django.db import connections

        try:
            while not JOURNAL and not done.is_set():
                time.sleep(0.01)
            while not done.is_set():
                swept = sweep_runs()
                seen.append((time.monotonic(), run_advance(run.pk), swept))
                time.sleep(0.03)
        finally:
            connections.close_all()

    b = threading.Thread(target=worker_b, name="worker-b")
    b.start()
    try:
        with suppress(Died):
            run_advance(run.pk)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not Run.objects.get(pk=run.pk).is_final:
            time.sleep(0.05)
    finally:
        done.set()
        b.join(timeout=30)
    a_runs = [e for e in JOURNAL if e["worker"] == "MainThread"]
    b_runs = [e for e in JOURNAL if e["worker"] == "worker-b"]
    a_stopped = min((t for t, who, _, _ in stops if who == "MainThread"), default=None)
    a_end = min(filter(None, [a_runs[0]["ended"], a_stopped])) if a_runs else None
    overlap = [b_run["began"] for b_run in b_runs if a_end and b_run["began"] < a_end]
    assert not overlap, (
        f"worker B began executing the step {a_end - overlap[0]:.2f} s before worker A's "
        f"execution ended or A stopped itself (A stopped: {a_stopped is not None}); "
        f"B's outcomes {[o for _, o, _ in seen if o != 'skipped']}"
    )


# --- a task's time limit interrupting the wait --------------------------------------------------


def test_a_time_limit_that_interrupts_the_wait_abandons_the_call_without_running_it_twice(gate):
    """Celery raises ``SoftTimeLimitExceeded`` into the task's thread, which waits for the call
    on the helper thread. The call runs on: the wait is abandoned, the attempt recorded as a
    retry, and the lease given back only once the call has ended (within the grace period)."""
    from billiard.exceptions import SoftTimeLimitExceeded

    def time_limit(*_):
        raise SoftTimeLimitExceeded()

    run = run_start(
        workflow="outage.one", input={"tool": "outage.slow", "label": "limit", "seconds": 1.5}
    )
    previous = signal.signal(signal.SIGALRM, time_limit)
    signal.setitimer(signal.ITIMER_REAL, 0.4)  # as billiard's soft limit, in the task's thread
    try:
        assert run_advance(run.pk) == "waiting"
        returned = time.monotonic()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    step = Step.objects.get(run_id=run.pk)
    assert (step.status, step.failures) == ("retrying", 1)
    assert "SoftTimeLimitExceeded" in step.error
    (entry,) = JOURNAL
    assert entry["ended"] is not None and entry["ended"] <= returned  # ended before the release
