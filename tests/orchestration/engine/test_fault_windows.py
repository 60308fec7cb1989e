"""Faults in the engine's critical windows, injected in one process: a worker that dies between
claiming a run and running it, a decision that commits while the worker suspends the run, the
database dropping its connections under a slice, and a step that outlives the run's lease.

The task bodies (``run_advance``, ``run_claim``, ``sweep_runs``) are driven directly, on the test
database; the faults are injected at the engine's named points (``orchestration.engine.faults``)
or by the tools and the gate themselves. A worker that "dies" simply stops: its lease is then
moved into the past, which is what the passage of time does."""

import threading
import time
from collections import Counter, defaultdict
from datetime import timedelta

import psycopg
import pytest
from django.db import OperationalError, connection, connections
from django.utils import timezone

from orchestration.demo.models import InfraChange
from orchestration.engine import faults, steps
from orchestration.engine.runner import run_advance, run_claim
from orchestration.engine.timeouts import close_helper_connections
from orchestration.gate import Verdict
from orchestration.registry.declare import tool, workflow
from orchestration.registry.models import Agent, Tool
from orchestration.runs.models import Run, Step
from orchestration.runs.services import run_halt, run_resume, run_start
from orchestration.tasks import advance_run, sweep_runs
from tests.orchestration.engine.conftest import drive
from tests.orchestration.engine.puppet import Turn

# Tools run on the engine's helper thread, with a connection of its own: the tests commit.
pytestmark = pytest.mark.django_db(transaction=True)

KIND = "windows"
LABEL = {
    "type": "object",
    "properties": {"label": {"type": "string"}},
    "required": ["label"],
    "additionalProperties": False,
}

CALLS: Counter[str] = Counter()  # label -> executions of a tool body that reached its effect
KEYS: dict[str, list[str]] = defaultdict(list)  # label -> idempotency keys, one per execution
PLANS: dict[str, list[str]] = {}  # label -> what each execution meets: "drop", "fail" or "ok"
SWALLOWED: list[str] = []  # what a workflow's `except Exception` caught
LONG: list[dict] = []  # what each execution of windows.long saw
OUTAGE = {"on": False, "failures": 0, "limit": 0}  # renewals of the lease refused meanwhile
STOPS: list[tuple[float, str]] = []  # stop_process calls: (monotonic time, why)


# --- PostgreSQL: dropping connections -----------------------------------------------------


def terminate_backends(pids: list[int] | None = None) -> int:
    """End the test database's sessions (``pids``, or all but this one), as a restart or a
    failover of the server does, and wait until they are gone."""
    db = connection.settings_dict
    query = (
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    with psycopg.connect(
        dbname=db["NAME"],
        user=db["USER"] or None,
        password=db["PASSWORD"] or None,
        host=db["HOST"] or None,
        port=db["PORT"] or None,
        autocommit=True,
    ) as admin:
        if pids is None:
            rows = admin.execute(query).fetchall()
        else:
            rows = admin.execute(query + " AND pid = ANY(%s)", [pids]).fetchall()
    assert rows and all(ended for (ended,) in rows), rows
    return len(rows)


def backend_pid() -> int:
    """The server process behind this thread's connection."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


@pytest.fixture
def kept_connections(transactional_db, monkeypatch):
    """Connections kept between uses, as in production (``CONN_MAX_AGE`` 60): the tests' 0
    closes them around every use, which would replace a dead one before anything met it."""
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 60)
    connection.close()  # both reopen with the production setting
    close_helper_connections()
    yield
    connection.close()  # whatever a test left dead here; the test database's flush reconnects


# --- tools and workflows --------------------------------------------------------------------


def make_effect(label: str, idempotency_key: str) -> dict:
    change, _ = InfraChange.objects.get_or_create(
        idempotency_key=idempotency_key, defaults={"kind": KIND, "target": label}
    )
    CALLS[label] += 1
    return {"change_id": change.pk, "label": label}


@tool("windows.effect", side_effect="write", schema=LABEL)
def effect(*, label: str, idempotency_key: str) -> dict:
    """Make a visible, idempotent effect."""
    return make_effect(label, idempotency_key)


@tool("windows.drops", side_effect="write", schema=LABEL)
def drops(*, label: str, idempotency_key: str) -> dict:
    """Make an effect; its execution number N meets ``PLANS[label][N]`` first: its database
    connection dropped by the server ("drop", the default for the first), a failure of the
    service it calls ("fail"), or nothing ("ok")."""
    KEYS[label].append(idempotency_key)
    plan = PLANS.get(label, ["drop"])
    meets = plan[len(KEYS[label]) - 1] if len(KEYS[label]) <= len(plan) else "ok"
    if meets == "drop":
        terminate_backends([backend_pid()])
    elif meets == "fail":
        raise ConnectionError("the upstream service reset the connection")
    return make_effect(label, idempotency_key)  # on a dropped connection: OperationalError


def lease_of(run_id: int) -> tuple[str, object]:
    run = Run.objects.get(pk=run_id)
    return run.lease_owner, run.lease_expires_at


@tool("windows.long", side_effect="write", timeout=10, schema={"type": "object"})
def long_step(*, run_id: int, seconds: float, meanwhile: str = "", idempotency_key: str) -> dict:
    """A step that outlives the run's lease; ``meanwhile`` happens as it begins."""
    seen = {"began": time.monotonic(), "lease": lease_of(run_id)}
    LONG.append(seen)
    if meanwhile == "taken":  # another worker claimed the run (its lease had expired)
        Run.objects.filter(pk=run_id).update(
            lease_owner="another-worker", lease_expires_at=timezone.now() + timedelta(minutes=1)
        )
    elif meanwhile == "halted":
        run_halt(run=run_id, by="reviewer-ann", reason="stop the long step")
    elif meanwhile == "outage":  # the database refuses the worker's renewals
        OUTAGE["on"] = True
    time.sleep(seconds)
    OUTAGE["on"] = False
    seen.update(ended=timezone.now(), lease_after=lease_of(run_id))
    CALLS["long"] += 1
    return {"slept": seconds}


@workflow("windows.gated", tools=["windows.effect"])
def gated(ctx, label: str = "approved") -> dict:
    return ctx.tool("windows.effect", label=label)


@workflow("windows.sleepy", tools=["windows.effect"])
def sleepy(ctx, label: str = "timer") -> dict:
    before = ctx.tool("windows.effect", label=f"{label}-before")
    ctx.sleep(0.05)
    after = ctx.tool("windows.effect", label=f"{label}-after")
    return {"changes": [before["change_id"], after["change_id"]]}


@workflow("windows.two_steps", tools=["windows.effect"])
def two_steps(ctx, label: str = "two") -> dict:
    first = ctx.tool("windows.effect", label=f"{label}-1")
    second = ctx.tool("windows.effect", label=f"{label}-2")
    return {"changes": [first["change_id"], second["change_id"]]}


@workflow("windows.drops", tools=["windows.drops"])
def dropping(ctx, label: str = "dropped") -> dict:
    return ctx.tool("windows.drops", label=label)


@workflow("windows.swallows", tools=["windows.effect", "windows.drops"])
def swallows(ctx, tool: str, label: str) -> dict:
    try:
        return ctx.tool(tool, label=label)
    except Exception as exc:  # a workflow that swallows errors must not swallow the database's
        SWALLOWED.append(f"{type(exc).__name__}: {exc}")
        return {"swallowed": True}


@workflow("windows.agent", tools=["windows.drops"])
def agent_loop(ctx, label: str = "agent") -> dict:
    return {"answer": ctx.agent("faulty", goal=f"make the change {label}", tools=["windows.drops"])}


@workflow("windows.long", tools=["windows.long"])
def long_workflow(ctx, seconds: float, meanwhile: str = "") -> dict:
    return ctx.tool("windows.long", run_id=ctx.run.pk, seconds=seconds, meanwhile=meanwhile)


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    KEYS.clear()
    PLANS.clear()
    SWALLOWED.clear()
    LONG.clear()
    STOPS.clear()
    OUTAGE.update(on=False, failures=0, limit=0)


@pytest.fixture
def inject():
    """``inject(point, run_id, action)``: run ``action()`` the first time the engine reaches
    ``point`` for that run."""
    removers = []

    def install(point: str, run_id: int, action) -> None:
        armed = [True]

        def hook(name: str, at_run: int) -> None:
            if name == point and at_run == run_id and armed[0]:
                armed[0] = False
                action()

        removers.append(faults.install(hook))

    yield install
    for remove in removers:
        remove()


@pytest.fixture
def stops(monkeypatch):
    """``stop_process`` records instead of ending pytest's process."""
    monkeypatch.setattr(
        steps, "stop_process", lambda why: STOPS.append((time.monotonic(), why)), raising=False
    )
    return STOPS


def effects(label: str) -> int:
    return InfraChange.objects.filter(target=label).count()


def expire_lease(run_id: int) -> None:
    """What time does to the lease of a worker that died."""
    past = timezone.now() - timedelta(seconds=1)
    assert Run.objects.filter(pk=run_id).update(lease_expires_at=past) == 1


def make_due(run_id: int) -> None:
    """What time does to a run due later (an interruption's retry, a backoff)."""
    Run.objects.filter(pk=run_id).update(wake_at=timezone.now())


def settle(run_id: int, *, rounds: int = 30) -> Run:
    """Like ``drive``, for workflows without ``ctx.sleep``: a run due later is made due at once
    instead of waiting for it."""
    for _ in range(rounds):
        run_advance(run_id)
        run = Run.objects.get(pk=run_id)
        if run.is_final or (run.status == "waiting" and run.wake_at is None):
            return run
        if run.wake_at and run.wake_at > timezone.now():
            make_due(run_id)
    raise AssertionError(f"run {run_id} did not settle in {rounds} rounds")


def assert_interrupted_and_due_shortly(run_id: int) -> Run:
    """What ``run_advance`` leaves after the database failed under a slice: not failed, the lease
    given back, due again in about two seconds (the sweep takes it up then, not before)."""
    run = Run.objects.get(pk=run_id)
    assert run.status == "running" and run.error == ""
    assert run.lease_owner == "" and run.lease_expires_at is None
    assert timezone.now() < run.wake_at <= timezone.now() + timedelta(seconds=3)
    assert sweep_runs() == 0  # not yet due
    make_due(run_id)
    assert sweep_runs() == 1
    assert run.events.filter(kind="run.interrupted").exists()
    return run


# --- 1. a worker that dies between claiming a run and running it ------------------------------


def test_a_resumed_run_whose_worker_died_after_claiming_it_is_taken_up_by_the_sweep(gate):
    gate.verdicts["windows.effect"] = Verdict("pending")
    run = drive(run_start(workflow="windows.gated", input={"label": "claimed"}).pk)
    assert (run.status, run.wake_at) == ("waiting", None)

    gate.verdicts["windows.effect"] = Verdict("approved")
    run_resume(run_id=run.pk, note="approved")
    assert run_claim(run.pk)  # a worker takes the message, claims the run, and dies
    claimed = Run.objects.get(pk=run.pk)
    assert sweep_runs() == 0  # its lease still runs: nobody else may take the run yet

    expire_lease(run.pk)
    assert sweep_runs() == 1  # the run is not stranded
    run = drive(run.pk)
    assert run.status == "completed", run.error
    assert effects("claimed") == 1 and CALLS["claimed"] == 1
    # What a claim leaves: a running run, never one that waits for nobody.
    assert (claimed.status, claimed.wake_at) == ("running", None)


def test_a_run_woken_by_its_timer_whose_worker_died_after_claiming_it_is_taken_up(gate):
    run = drive(run_start(workflow="windows.sleepy", input={"label": "timer"}).pk, timers=False)
    assert run.status == "waiting" and run.wake_at is not None
    time.sleep(max(0.0, (run.wake_at - timezone.now()).total_seconds()) + 0.01)

    assert run_claim(run.pk)  # woken by its timer, claimed, and the worker dies
    claimed = Run.objects.get(pk=run.pk)
    expire_lease(run.pk)
    assert sweep_runs() == 1
    run = drive(run.pk)
    assert run.status == "completed", run.error
    assert effects("timer-before") == effects("timer-after") == 1
    assert CALLS["timer-before"] == CALLS["timer-after"] == 1
    assert (claimed.status, claimed.wake_at) == ("running", None)


def test_a_sweep_mark_landing_after_a_claim_does_not_hold_back_the_run_s_next_timer(gate, inject):
    """The sweep selects a due run and marks it swept; a worker may claim the run in between
    (its resume message came first). The late mark must not keep the run's next timer from
    the sweep for SWEEP_AGAIN: its new state clears it."""
    run = run_start(workflow="windows.sleepy", input={"label": "marked"})
    # As the racing sweep would: a mark landing just after this worker's claim.
    inject(
        faults.CLAIMED,
        run.pk,
        lambda: Run.objects.filter(pk=run.pk).update(swept_at=timezone.now()),
    )
    assert run_advance(run.pk) == "waiting"  # sleeping now
    make_due(run.pk)
    assert sweep_runs() == 1  # its timer is swept at once, not ten seconds later


# --- 2. a decision that commits while the worker suspends the run ---------------------------


def test_a_decision_committed_while_the_worker_suspends_the_run_is_kept(gate, inject):
    gate.verdicts["windows.effect"] = Verdict("pending")
    run = run_start(workflow="windows.gated", input={"label": "decided"})

    def decided_meanwhile() -> None:
        # After the worker decided to suspend and before it locks the run; later than any
        # moment it could have read the clock before.
        time.sleep(0.005)
        gate.verdicts["windows.effect"] = Verdict("approved")
        run_resume(run_id=run.pk, note="approved while the worker suspended the run")

    inject(faults.FINISHING, run.pk, decided_meanwhile)
    assert run_advance(run.pk) == "waiting"
    run = Run.objects.get(pk=run.pk)
    assert (run.status, run.lease_owner) == ("waiting", "")
    assert run.wake_at is not None  # still due: the decision is not erased
    assert sweep_runs() == 1  # beat would wake it even if the resume's message were lost
    run = drive(run.pk)
    assert run.status == "completed", run.error
    assert effects("decided") == 1 and CALLS["decided"] == 1
    assert [a.tool for a in gate.reviewed] == ["windows.effect", "windows.effect"]


# --- 3. the database drops its connections (PostgreSQL) -------------------------------------


@pytest.mark.postgres
def test_connections_dropped_as_a_slice_begins_interrupt_it_and_the_run_completes(
    gate, inject, kept_connections
):
    run = run_start(workflow="windows.sleepy", input={"label": "restart"})
    assert run_advance(run.pk) == "waiting"  # the first effect made; both threads connected
    time.sleep(0.06)

    # The server restarts just as a worker claims the run: the worker's connection and the
    # helper thread's (kept since the first slice) are both dead.
    inject(faults.CLAIMED, run.pk, terminate_backends)
    assert run_advance(run.pk) == "interrupted"
    assert_interrupted_and_due_shortly(run.pk)

    run = drive(run.pk)
    assert run.status == "completed", run.error
    assert effects("restart-before") == effects("restart-after") == 1
    assert CALLS["restart-before"] == CALLS["restart-after"] == 1


@pytest.mark.postgres
def test_connections_dropped_between_two_steps_interrupt_the_slice_not_the_run(
    gate, inject, kept_connections
):
    run = run_start(workflow="windows.two_steps", input={"label": "between"})
    # The first step's effect is made; then the server restarts before anything is recorded.
    inject(faults.EXECUTED, run.pk, terminate_backends)
    assert run_advance(run.pk) == "interrupted"
    assert_interrupted_and_due_shortly(run.pk)
    first = Step.objects.get(run_id=run.pk, seq=1)
    assert first.status == "completed"  # what the slice finished is recorded once it can be

    run = drive(run.pk)
    assert run.status == "completed", run.error
    assert effects("between-1") == effects("between-2") == 1
    assert CALLS["between-1"] == CALLS["between-2"] == 1  # the first step was not re-executed


@pytest.mark.postgres
def test_a_tool_whose_connection_drops_is_re_executed_with_the_same_key_not_failed(
    gate, kept_connections
):
    # Dropped as often as the tool's retry policy allows attempts: none of them is a failure.
    PLANS["dropped"] = ["drop", "drop", "drop"]
    run = run_start(workflow="windows.drops", input={"label": "dropped"})
    for _ in PLANS["dropped"]:
        assert run_advance(run.pk) == "interrupted"
        assert_interrupted_and_due_shortly(run.pk)
    run = drive(run.pk)
    assert run.status == "completed", run.error
    key = f"run-{run.pk}-step-1"
    assert KEYS["dropped"] == [key] * 4
    assert effects("dropped") == 1 and CALLS["dropped"] == 1
    step = run.step_set.get()
    assert (step.status, step.error, step.error_type) == ("completed", "", "")
    assert not run.events.filter(kind__in=["tool.retrying", "tool.failed", "run.failed"]).exists()


@pytest.mark.postgres
def test_interruptions_do_not_use_up_the_retries_a_tool_s_own_failure_has(gate, kept_connections):
    """The tool policy allows three attempts for the tool's own failures. Two interruptions
    and one failure of the service it calls are one failed attempt: it is retried."""
    PLANS["budget"] = ["drop", "drop", "fail", "ok"]
    run = settle(run_start(workflow="windows.drops", input={"label": "budget"}).pk)
    assert run.status == "completed", run.error
    assert effects("budget") == 1
    assert run.events.filter(kind="tool.retrying").count() == 1


@pytest.mark.postgres
def test_an_approved_action_whose_connection_drops_in_an_agent_loop_is_executed(
    gate, puppet, kept_connections
):
    Tool.objects.get_or_create(name="windows.drops", defaults={"side_effect": "write"})
    faulty = Agent.objects.create(name="faulty", provider="puppet", model="puppet-1")
    faulty.tools.set(Tool.objects.filter(name="windows.drops"))
    puppet.turns = [Turn(calls=[("windows.drops", {"label": "agent"})]), Turn(text="Changed.")]
    gate.verdicts["windows.drops"] = Verdict("pending")
    run = drive(run_start(workflow="windows.agent", input={"label": "agent"}).pk)
    assert run.status == "waiting"

    gate.verdicts["windows.drops"] = Verdict("approved")
    run_resume(run_id=run.pk, note="approved")
    run = settle(run.pk)
    assert run.status == "completed", run.error
    assert effects("agent") == 1 and CALLS["agent"] == 1  # executed, not skipped
    # What the model was told is the tool's result, not the database's failure.
    last = run.step_set.filter(kind="llm").order_by("-seq").first()
    told = [m["content"] for m in last.input["messages"] if m["role"] == "tool"]
    assert len(told) == 1 and '"label":"agent"' in told[0] and "error" not in told[0]
    assert KEYS["agent"] == [f"run-{run.pk}-step-2"] * 2
    assert run.events.filter(kind="run.interrupted").exists()
    assert run.result == {"answer": "Changed."}


@pytest.mark.postgres
def test_except_exception_cannot_swallow_a_tool_s_dropped_connection(gate, kept_connections):
    run = settle(
        run_start(workflow="windows.swallows", input={"tool": "windows.drops", "label": "s"}).pk
    )
    assert SWALLOWED == []
    assert run.status == "completed", run.error
    assert run.result["label"] == "s" and effects("s") == 1
    assert run.events.filter(kind="run.interrupted").exists()


@pytest.mark.postgres
def test_except_exception_cannot_swallow_the_gate_s_dropped_connection(
    gate, kept_connections, monkeypatch
):
    original = gate.review
    dropped: list[int] = []

    def review_on_a_dropped_connection(self, action, *, run_id, step_seq):
        if not dropped:  # the server restarts as the gate begins its review
            dropped.append(run_id)
            terminate_backends([backend_pid()])
        Step.objects.filter(run_id=run_id).count()  # it reads the run, as the policy gate does
        return original(self, action, run_id=run_id, step_seq=step_seq)

    monkeypatch.setattr(gate, "review", review_on_a_dropped_connection)
    run = run_start(workflow="windows.swallows", input={"tool": "windows.effect", "label": "g"})
    try:
        outcome = run_advance(run.pk)
    finally:
        assert SWALLOWED == []  # whatever the slice did after it
    assert outcome == "interrupted"
    run = settle(run.pk)
    assert run.status == "completed", run.error
    assert run.result["label"] == "g" and effects("g") == 1
    assert dropped == [run.pk] and len(gate.reviewed) == 1  # reviewed once it could read


@pytest.mark.postgres
def test_a_celery_task_after_a_restart_gets_fresh_connections(gate, kept_connections):
    run = run_start(workflow="windows.sleepy", input={"label": "task"})
    assert run_advance(run.pk) == "waiting"  # both threads connected
    time.sleep(0.06)
    terminate_backends()  # the server restarts between two tasks

    # apply() runs the task as a worker does, through Celery's tracer, which sends
    # task_prerun (its handler replaces the dead connection before the task's first query).
    result = advance_run.apply(args=[run.pk])
    assert result.successful(), result.traceback
    assert result.result == "completed"
    assert effects("task-before") == effects("task-after") == 1
    assert not Run.objects.get(pk=run.pk).events.filter(kind="run.interrupted").exists()


# --- 4. a step longer than the lease --------------------------------------------------------


def test_a_step_longer_than_the_lease_keeps_it_and_runs_once(gate, settings, stops):
    settings.BATON_LEASE_SECONDS = 1
    run = run_start(workflow="windows.long", input={"seconds": 2.5})
    done = threading.Event()
    others: list[str] = []
    swept: list[int] = []

    def another_worker() -> None:
        """Tries to take the run, and runs it if it may, all the while the step executes."""
        try:
            while not LONG and not done.is_set():
                time.sleep(0.01)
            while not done.is_set():
                others.append(run_advance(run.pk))
                swept.append(sweep_runs())
                time.sleep(0.05)
        finally:
            connections.close_all()

    thread = threading.Thread(target=another_worker)
    thread.start()
    try:
        outcome = run_advance(run.pk)
    finally:
        done.set()
        thread.join(timeout=20)
    assert not thread.is_alive()
    assert len(others) > 10 and set(others) == {"skipped"}  # never got the run
    assert set(swept) == {0}
    assert CALLS["long"] == 1
    assert outcome == "completed"
    (seen,) = LONG
    owner, expires = seen["lease"]
    owner_after, expires_after = seen["lease_after"]
    assert owner_after == owner  # still this worker's at the end of the step
    assert expires_after > seen["ended"]  # renewed while the step ran, 2.5 times its lease
    assert expires_after >= expires + timedelta(seconds=1)
    assert STOPS == []


def test_a_worker_whose_run_was_taken_during_a_step_stops_itself(gate, settings, stops):
    settings.BATON_LEASE_SECONDS = 1
    run = run_start(workflow="windows.long", input={"seconds": 0.8, "meanwhile": "taken"})
    assert run_advance(run.pk) == "stopped"
    assert STOPS, "the worker went on executing a step another worker holds"
    assert all(f"run {run.pk} is leased to another worker" in why for _, why in STOPS)
    assert Run.objects.get(pk=run.pk).lease_owner == "another-worker"  # not overwritten


def test_a_worker_that_cannot_renew_its_lease_stops_itself_before_it_may_expire(
    gate, settings, stops, monkeypatch
):
    settings.BATON_LEASE_SECONDS = 1
    original = steps.lease_expiry

    def lease_expiry(now):  # the renewal's query, refused while the database is unreachable
        if OUTAGE["on"] and OUTAGE["failures"] < OUTAGE["limit"]:
            OUTAGE["failures"] += 1
            raise OperationalError("server closed the connection unexpectedly")
        return original(now)

    monkeypatch.setattr(steps, "lease_expiry", lease_expiry)
    OUTAGE["limit"] = 1000
    run = run_start(workflow="windows.long", input={"seconds": 1.5, "meanwhile": "outage"})
    run_advance(run.pk)
    assert STOPS, "the worker went on executing a step whose lease may have expired"
    (began,) = [seen["began"] for seen in LONG]
    first, why = STOPS[0]
    assert f"could not renew the lease of run {run.pk}" in why
    assert OUTAGE["failures"] >= 2
    # Not at the first refused renewal: only once the lease may have run out (it lasts 1 s).
    assert 0.5 <= first - began <= 1.25


def test_a_brief_outage_within_the_lease_does_not_stop_the_worker(
    gate, settings, stops, monkeypatch
):
    settings.BATON_LEASE_SECONDS = 1
    original = steps.lease_expiry

    def lease_expiry(now):
        if OUTAGE["on"] and OUTAGE["failures"] < OUTAGE["limit"]:
            OUTAGE["failures"] += 1
            raise OperationalError("server closed the connection unexpectedly")
        return original(now)

    monkeypatch.setattr(steps, "lease_expiry", lease_expiry)
    OUTAGE["limit"] = 2  # two renewals refused, then the database answers again
    run = run_start(workflow="windows.long", input={"seconds": 1.5, "meanwhile": "outage"})
    assert run_advance(run.pk) == "completed"
    assert OUTAGE["failures"] == 2 and STOPS == []
    (seen,) = LONG
    assert seen["lease_after"][1] > seen["ended"]  # renewed once it could be


def test_a_halt_during_a_long_step_does_not_stop_the_worker(gate, settings, stops):
    settings.BATON_LEASE_SECONDS = 1
    run = run_start(workflow="windows.long", input={"seconds": 0.8, "meanwhile": "halted"})
    assert run_advance(run.pk) == "stopped"
    assert STOPS == []  # a halt ends the lease; the call already running is not a takeover
    run = Run.objects.get(pk=run.pk)
    assert run.status == "halted" and CALLS["long"] == 1
