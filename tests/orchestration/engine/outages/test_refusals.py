"""What the database refuses and what it cannot answer, told apart; the lease keeper's own
trouble; steps that keep being cut short; ctx calls inside a workflow's own transaction; and
an upgrade across the retry counter's migrations. Each was a break a red-team review found."""

import threading
import time
from contextlib import suppress

import pytest
from django.db import InterfaceError, connection
from django.db.backends.signals import connection_created
from django.utils import timezone

from orchestration.engine import faults, steps
from orchestration.engine.context import CUT_SHORT_LIMIT
from orchestration.engine.errors import LeaseLost
from orchestration.engine.runner import run_advance
from orchestration.gate import Verdict
from orchestration.runs.models import Run
from orchestration.runs.services import run_resume, run_start
from orchestration.tasks import sweep_runs
from tests.orchestration.engine.outages.helpers import admin_connection, describe, expire_lease
from tests.orchestration.engine.outages.refusals import CALLS, SWALLOWED
from tests.orchestration.engine.outages.workflows import JOURNAL, RELEASE, Died

pytestmark = pytest.mark.django_db(transaction=True)


# --- helpers ----------------------------------------------------------------------------------


def advance(run_id: int, *, rounds: int) -> list[str]:
    """Advance as workers and the sweep would: a run due later is made due at once, a worker
    that died (or whose task raised) leaves its lease, which then expires."""
    outcomes = []
    for _ in range(rounds):
        try:
            outcomes.append(run_advance(run_id))
        except Died:
            outcomes.append("died")
            expire_lease(run_id)
        except LeaseLost as exc:  # escaped the task: the lease stays until it expires
            outcomes.append(f"raised LeaseLost({exc})")
            expire_lease(run_id)
        run = Run.objects.get(pk=run_id)
        if run.is_final or (run.status == "waiting" and run.wake_at is None):
            break
        if outcomes[-1] == "stopped" and run.lease_owner:
            expire_lease(run_id)  # returned holding its lease: the sweep takes it after expiry
        if run.wake_at and run.wake_at > timezone.now():
            Run.objects.filter(pk=run_id).update(wake_at=timezone.now())
    return outcomes


# --- 1. is_outage: a deterministic refusal in an "outage" SQLSTATE class ---------------------


@pytest.mark.postgres
def test_a_query_over_temp_file_limit_is_the_step_s_bounded_failure_not_an_endless_outage(gate):
    """SQLSTATE 53400 (temp_file_limit exceeded) is refused every time, like a statement
    timeout: the tool's own failure, bounded by its retry policy, never an outage that
    re-executes the report forever."""
    run = run_start(workflow="refusal.one", input={"tool": "refusal.big_report", "label": "spill"})
    outcomes = advance(run.pk, rounds=8)
    run = Run.objects.get(pk=run.pk)
    assert run.is_final and CALLS["spill"] <= 3, (
        f"after {len(outcomes)} slices {outcomes} the report executed {CALLS['spill']} times; "
        f"{describe(run.pk)}"
    )


# --- 2. is_outage: a lock held by another writer on PostgreSQL --------------------------------


@pytest.fixture
def lock_timeout():
    """The database's lock_timeout (a common production setting: ALTER ROLE ... SET
    lock_timeout), on every connection this process opens."""

    def set_it(sender, connection, **kwargs):
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '300ms'")

    connection_created.connect(set_it)
    connection.close()
    yield
    connection_created.disconnect(set_it)
    connection.close()


@pytest.mark.postgres
@pytest.mark.parametrize("workflow", ["refusal.approved", "refusal.approved_or_fallback"])
@pytest.mark.parametrize("how", ["lock_timeout", "pg_cancel_backend"])
def test_a_lock_wait_at_the_fence_of_an_approved_action_does_not_fail_or_skip_it(
    gate, lock_timeout, how, workflow
):
    """A reviewer approves; as the worker fences before executing, another session holds the
    run's row for a moment (a decision's transaction, a DBA's UPDATE), and lock_timeout (55P03)
    or an operator's cancel (57014) ends the wait. The engine's own bookkeeping failed: the
    slice is interrupted, and the approved action executes later. Neither a failed run nor,
    in a workflow that catches Exception, a silently skipped action."""
    gate.verdicts["refusal.effect"] = Verdict("pending")
    run = run_start(workflow=workflow, input={"label": how})
    assert run_advance(run.pk) == "waiting"
    gate.verdicts["refusal.effect"] = Verdict("approved")
    run_resume(run_id=run.pk, note="approved")

    leases: list[str] = []
    refused: list[str] = []

    def hold_the_row_at_the_fence(execute, sql, params, many, context_):
        if not (sql.startswith('UPDATE "orchestration_run" SET "lease_expires_at"')):
            return execute(sql, params, many, context_)
        leases.append(sql)
        if len(leases) != 2:  # 1: the step's start; 2: the fence just before the effect
            return execute(sql, params, many, context_)
        pid = context_["connection"].connection.info.backend_pid
        holder = admin_connection()
        holder.execute("SET lock_timeout = 0")
        holder.autocommit = False
        holder.execute("SELECT 1 FROM orchestration_run WHERE id = %s FOR UPDATE", [run.pk])

        def cancel_when_waiting():
            with admin_connection() as admin:
                for _ in range(200):
                    waiting = admin.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = "
                        "'Lock'",
                        [pid],
                    ).fetchone()
                    if waiting:
                        admin.execute("SELECT pg_cancel_backend(%s)", [pid])
                        return
                    time.sleep(0.01)

        canceller = threading.Thread(target=cancel_when_waiting)
        if how == "pg_cancel_backend":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = 0")
            canceller.start()
        try:
            return execute(sql, params, many, context_)
        except Exception as exc:
            refused.append(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            holder.commit()  # the other writer is done a moment later
            holder.close()
            if canceller.is_alive() or how == "pg_cancel_backend":
                canceller.join()

    with connection.execute_wrapper(hold_the_row_at_the_fence):
        outcome = run_advance(run.pk)
    assert refused, leases
    outcomes = [outcome, *advance(run.pk, rounds=6)]
    run = Run.objects.get(pk=run.pk)
    assert run.status == "completed" and CALLS[how] == 1 and not SWALLOWED, (
        f"a {how} at the fence ({refused[0]}) -> {outcomes}; the approved action executed "
        f"{CALLS[how]} times; the workflow caught {SWALLOWED}; result {run.result}; "
        f"{describe(run.pk)}"
    )


# --- 3. is_outage: a connection the server ended for idling (57P05) --------------------------


@pytest.mark.postgres
def test_except_exception_cannot_swallow_a_connection_the_server_ended_for_idling(gate):
    """PostgreSQL 14+ ends a session idle longer than idle_session_timeout with SQLSTATE 57P05,
    as a restart ends it with 57P01. The worker's connection idles while a tool runs on the
    helper thread; the next step's start meets the ended session. The workflow's `except
    Exception` must not take that for the tool's failure: the slice is interrupted and step 2
    still executes."""
    run = run_start(workflow="refusal.swallows", input={"label": "idle", "seconds": 1.0})
    with connection.cursor() as cursor:
        cursor.execute("SET idle_session_timeout = '300ms'")
    outcomes = [run_advance(run.pk), *advance(run.pk, rounds=6)]
    run = Run.objects.get(pk=run.pk)
    assert SWALLOWED == [] and run.status == "completed" and CALLS["idle-2"] == 1, (
        f"workflow code caught {SWALLOWED} and went on as if the step had failed; {outcomes}; "
        f"result {run.result}; step 2 executed {CALLS['idle-2']} times; {describe(run.pk)}"
    )


# --- 4. the LeaseKeeper: an error in tick() leaves the call running, the lease given back -----


def _b_overlaps_a(run_id: int, prepare) -> tuple[list, list, list]:
    """Worker A (this thread) executes a 4 s step under a 1 s lease; worker B sweeps and
    advances as soon as it may. Returns A's executions, B's executions, and B's outcomes."""
    done = threading.Event()
    seen: list[str] = []

    def worker_b() -> None:
        from django.db import connections

        try:
            while not JOURNAL and not done.is_set():
                time.sleep(0.01)
            while not done.is_set():
                sweep_runs()
                seen.append(run_advance(run_id))
                time.sleep(0.03)
        except Died:
            seen.append("died")
        finally:
            connections.close_all()

    prepare()
    b = threading.Thread(target=worker_b, name="worker-b")
    b.start()
    try:
        with suppress(Died):
            seen.append(f"A: {run_advance(run_id)}")
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline and not Run.objects.get(pk=run_id).is_final:
            time.sleep(0.05)
    finally:
        done.set()
        b.join(timeout=30)
    a_runs = [e for e in JOURNAL if e["worker"] == "MainThread"]
    b_runs = [e for e in JOURNAL if e["worker"] == "worker-b"]
    return a_runs, b_runs, [o for o in seen if o != "skipped"]


@pytest.mark.parametrize("fault", ["renewal-interface-error", "time-limit-during-tick"])
def test_an_error_raised_in_the_keeper_s_tick_never_lets_a_step_run_twice_at_once(
    gate, settings, stops, worker_processes, monkeypatch, fault
):
    """Anything raised while the waiting thread is in keeper.tick() (a renewal failing with
    django.db.InterfaceError, a Celery soft time limit landing there) abandons the call like a
    timeout: the lease is kept until the call ended, so another worker never runs the step
    beside it."""
    from billiard.exceptions import SoftTimeLimitExceeded

    settings.BATON_LEASE_SECONDS = 1
    run = run_start(
        workflow="outage.one", input={"tool": "outage.slow", "label": fault, "seconds": 4}
    )

    def prepare():
        if fault == "renewal-interface-error":
            original = steps.lease_expiry
            raised: list[int] = []

            def lease_expiry(now):
                if threading.current_thread().name.startswith("baton-lease") and not raised:
                    raised.append(1)
                    raise InterfaceError("connection already closed")
                return original(now)

            monkeypatch.setattr(steps, "lease_expiry", lease_expiry)
        else:
            original_tick = steps.LeaseKeeper.tick
            landed: list[int] = []

            def tick(self):
                if threading.current_thread() is threading.main_thread() and not landed:
                    landed.append(1)
                    raise SoftTimeLimitExceeded()  # the signal lands here
                return original_tick(self)

            monkeypatch.setattr(steps.LeaseKeeper, "tick", tick)

    a_runs, b_runs, outcomes = _b_overlaps_a(run.pk, prepare)
    assert a_runs, outcomes
    a_end = a_runs[0]["ended"] or time.monotonic()
    overlap = [b["began"] for b in b_runs if b["began"] < a_end]
    assert not overlap, (
        f"worker B began executing the step {a_end - overlap[0]:.2f} s before worker A's call "
        f"ended; outcomes {outcomes}; stops {[s[2] for s in stops]}; {describe(run.pk)}"
    )


# --- 5. the LeaseKeeper: a slow renewal does not make the waiting thread spin -------------------


def test_a_slow_renewal_does_not_make_the_waiting_thread_busy_wait(gate, settings, monkeypatch):
    """While a renewal is in flight past its due time, the waiting thread polls for its answer
    every 50 ms; it never spins in a tight loop holding the interpreter beside the tool."""
    settings.BATON_LEASE_SECONDS = 8  # renewals every 2 s; stop at 7 s without one
    original = steps.lease_expiry

    def slow_renewal(now):
        if threading.current_thread().name.startswith("baton-lease"):
            time.sleep(3.5)  # a congested link: the renewal takes 3.5 s to come back
        return original(now)

    monkeypatch.setattr(steps, "lease_expiry", slow_renewal)
    ticks: list[float] = []
    original_tick = steps.LeaseKeeper.tick

    def counted(self):
        ticks.append(time.monotonic())
        return original_tick(self)

    monkeypatch.setattr(steps.LeaseKeeper, "tick", counted)
    run = run_start(
        workflow="outage.one", input={"tool": "outage.slow", "label": "spin", "seconds": 6}
    )
    cpu = time.process_time()
    assert run_advance(run.pk) == "completed", describe(run.pk)
    cpu = time.process_time() - cpu
    # A poll every 50 ms while the 3.5 s renewal is out, not a spin holding the interpreter.
    assert len(ticks) < 200 and cpu < 0.5, (
        f"the waiting thread ticked {len(ticks)} times during a 6 s step; the process used "
        f"{cpu:.2f} s of CPU while the tool slept"
    )


# --- 6. Step.failures: a step that kills its worker every time ---------------------------------


def test_a_step_that_kills_its_worker_every_time_is_not_retried_forever(gate):
    """A call that kills its worker (OOM, segfault, SIGKILL) never records a failure, so the
    retry policy never sees it: the step fails once CUT_SHORT_LIMIT attempts were cut short,
    instead of re-executing after every lease expiry forever."""
    run = run_start(workflow="refusal.one", input={"tool": "refusal.crash", "label": "poison"})
    outcomes = advance(run.pk, rounds=CUT_SHORT_LIMIT + 2)
    run = Run.objects.get(pk=run.pk)
    assert run.status == "failed" and CALLS["poison"] == CUT_SHORT_LIMIT, (
        f"the poison step killed its worker {CALLS['poison']} times and the run is "
        f"{run.status}: {outcomes}; {describe(run.pk)}"
    )
    assert f"cut short {CUT_SHORT_LIMIT} times" in run.error


# --- 7. ctx calls inside the workflow's own transaction -----------------------------------------


def test_workflow_steps_inside_the_workflow_s_own_transaction_are_applied_once(gate):
    """Workflow code wraps three steps in transaction.atomic() (its own writes with them). Their
    records would commit (or roll back) with the workflow's transaction, and the outbox would
    apply a finish twice before it commits: the run fails at once, saying why, and no tool
    executes, instead of re-executing the steps slice after slice."""
    run = run_start(workflow="refusal.atomic", input={"label": "tx", "count": 3})
    outcomes = advance(run.pk, rounds=5)
    run = Run.objects.get(pk=run.pk)
    # Refused, saying why, before any step: their records would roll back with the workflow's.
    assert run.status == "failed", f"{outcomes}; calls {dict(CALLS)}; {describe(run.pk)}"
    assert "inside a transaction the workflow opened" in run.error
    assert not CALLS and not run.step_set.exists()


def test_a_refusal_in_the_workflow_s_own_transaction_fails_the_run_once(gate):
    """A step inside the workflow's transaction whose own write is then refused would roll the
    step's row back with it, leaving a finish for a vanished step: the run fails at once,
    saying why, before the tool executes."""
    run = run_start(workflow="refusal.atomic_refused", input={"label": "vanished"})
    outcomes = advance(run.pk, rounds=5)
    run = Run.objects.get(pk=run.pk)
    assert run.status == "failed" and CALLS["vanished"] == 0, (
        f"{outcomes}; the step executed {CALLS['vanished']} times; {describe(run.pk)}"
    )
    assert "inside a transaction the workflow opened" in run.error


# --- 8. an upgrade across the retry counter's migrations ----------------------------------------


@pytest.fixture
def migrated_to_0012():
    """A database on 0012_step_interruptions (an `interruptions` column, NOT NULL without a
    database default, which is what AddField leaves), then upgraded to the latest."""
    from django.core.management import call_command

    call_command("migrate", "orchestration", "0012_step_interruptions", verbosity=0)
    call_command("migrate", "orchestration", verbosity=0)  # the upgrade
    yield


@pytest.mark.postgres
def test_a_database_migrated_before_the_rename_still_records_steps(gate, migrated_to_0012):
    run = run_start(workflow="refusal.one", input={"label": "upgraded"})
    outcomes = advance(run.pk, rounds=4)
    run = Run.objects.get(pk=run.pk)
    assert run.status == "completed", f"{outcomes}; {describe(run.pk)}"


# --- 9. _interrupted: how long a short outage holds a worker (a control) -------------------------


@pytest.mark.postgres
def test_a_short_outage_holds_the_worker_only_until_the_database_answers(gate, kept_connections):
    """With the default lease (60 s) _interrupted may retry for 30 s: a 2 s restart right after
    a step's call returned must cost the worker about 2 s, not 30, and lose nothing."""
    assert settings_lease() == 60
    name = connection.settings_dict["NAME"]
    run = run_start(workflow="outage.two", input={"label": "brief"})
    fired: list[float] = []
    with admin_connection("postgres") as admin:

        def restart(point: str, at_run: int) -> None:
            if point == faults.EXECUTED and at_run == run.pk and not fired:
                fired.append(time.monotonic())
                admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
                admin.execute(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    [name],
                ).fetchall()

                def back():
                    with admin_connection("postgres") as again:
                        again.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')

                threading.Timer(2.0, back).start()

        remove = faults.install(restart)
        try:
            outcome = run_advance(run.pk)
        finally:
            remove()
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    held = time.monotonic() - fired[0]
    outcomes = [outcome, *advance(run.pk, rounds=6)]
    run = Run.objects.get(pk=run.pk)
    assert outcome == "interrupted" and held < 5, f"held {held:.1f} s; {outcomes}"
    assert run.status == "completed", describe(run.pk)
    from tests.orchestration.engine.outages.workflows import CALLS as OUTAGE_CALLS

    assert OUTAGE_CALLS["brief-1"] == 1, describe(run.pk)


def settings_lease() -> int:
    from django.conf import settings

    return settings.BATON_LEASE_SECONDS


@pytest.fixture(autouse=True)
def _release_calls():
    yield
    RELEASE.set()
