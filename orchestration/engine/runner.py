"""Advancing a run: take its lease atomically (or do nothing), load its steps in one query, and
replay the workflow from the top until it suspends, completes, fails or its slice ends."""

import uuid
from typing import Any

from django.db import DatabaseError, transaction
from django.db.models import Q
from django.utils import timezone

from orchestration.canonical import CanonicalError, canonical_json
from orchestration.engine.context import Context
from orchestration.engine.errors import (
    BudgetExceeded,
    Halted,
    LeaseLost,
    NonDeterminismError,
    SliceEnded,
    Suspend,
)
from orchestration.engine.steps import lease_expiry
from orchestration.ledger.chain import ledger_append
from orchestration.registry.declare import RegistryError, get_workflow
from orchestration.runs.models import Event, Run, RunStatus
from orchestration.runs.realtime import broadcast_run

SLICE_SECONDS = 20.0
CLAIMABLE = [RunStatus.PENDING, RunStatus.RUNNING, RunStatus.WAITING]


def run_claim(run_id: int) -> str | None:
    """Take the run's lease if it is runnable, free and due; returns the lease token or None."""
    now = timezone.now()
    token = uuid.uuid4().hex
    claimed = (
        Run.objects.filter(pk=run_id, status__in=CLAIMABLE)
        .filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now))
        .filter(Q(wake_at__isnull=True) | Q(wake_at__lte=now))
        .update(lease_owner=token, lease_expires_at=lease_expiry(now), swept_at=None, wake_at=None)
    )
    return token if claimed else None


def run_advance(run_id: int, *, slice_seconds: float = SLICE_SECONDS) -> str:
    """Advance the run as far as it can go now. Returns what happened, for logs and tests."""
    lease = run_claim(run_id)
    if lease is None:
        return "skipped"
    run = Run.objects.select_related("agent").get(pk=run_id)
    was_waiting_for = _waiting_note(run)
    _mark_running(run, lease)
    steps = {step.seq: step for step in run.step_set.all()}
    ctx = Context(run, steps, lease=lease, slice_seconds=slice_seconds)
    try:
        definition = get_workflow(run.workflow, run.workflow_version)
        result = definition.fn(ctx, **run.input)
        if ctx.replaying:
            raise NonDeterminismError(
                f"the workflow returned at step {ctx.position} but the run recorded "
                f"{max(steps)} steps"
            )
        canonical_json(result, path="result")
    except Suspend as signal:
        note = "" if signal.reason == was_waiting_for else signal.reason  # no repeated events
        return _finish(ctx, lease, RunStatus.WAITING, wake_at=signal.wake_at, note=note)
    except SliceEnded:
        return _finish(ctx, lease, RunStatus.RUNNING, note="slice ended", requeue=True)
    except Halted:
        ctx.outbox.flush()  # steps that finished before the halt stay recorded
        return "stopped"
    except LeaseLost:
        return "stopped"
    except BudgetExceeded as exc:
        return _finish(ctx, lease, RunStatus.FAILED, error=f"Budget exhausted: {exc}")
    except NonDeterminismError as exc:
        return _finish(ctx, lease, RunStatus.FAILED, error=f"Non-determinism: {exc}")
    except (RegistryError, CanonicalError) as exc:
        return _finish(ctx, lease, RunStatus.FAILED, error=str(exc))
    except Exception as exc:
        return _finish(ctx, lease, RunStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
    return _finish(ctx, lease, RunStatus.COMPLETED, result=result)


def _record_what_ran(ctx: Context) -> None:
    """In the caller's transaction, on a run halted while this worker advanced it: the finishes
    of steps that ran still commit (fenced by attempt, so nothing a newer worker did is
    overwritten); anything the database refuses is dropped, the run being over already."""
    try:
        with transaction.atomic():
            ctx.outbox.apply()
    except (DatabaseError, LeaseLost):
        ctx.outbox.clear()


def _waiting_note(run: Run) -> str:
    """What a waiting run said it waits for (its last waiting event), to avoid repeating it."""
    if run.status != RunStatus.WAITING:
        return ""
    event = run.events.filter(kind="run.waiting").order_by("-id").first()
    return event.data.get("reason", "") if event else ""


def _mark_running(run: Run, lease: str) -> None:
    if run.status == RunStatus.RUNNING:
        return
    first = run.started_at is None
    with transaction.atomic():
        updated = Run.objects.filter(pk=run.pk, lease_owner=lease).update(
            status=RunStatus.RUNNING,
            started_at=run.started_at or timezone.now(),
            wake_at=None,
        )
        if updated and first:
            Event.objects.create(run=run, kind="run.started", message="Run started.")
            ledger_append(
                "run.started",
                actor="engine",
                run_id=run.pk,
                agent_id=run.agent_id,
                workflow=run.workflow,
                outcome="started",
                payload={"workflow": run.workflow, "version": run.workflow_version},
            )
        transaction.on_commit(lambda: broadcast_run(run.pk))
    run.refresh_from_db()


def _finish(
    ctx: Context,
    lease: str,
    status: str,
    *,
    result: Any = None,
    error: str = "",
    wake_at=None,
    note: str = "",
    requeue: bool = False,
) -> str:
    from orchestration.runs.services import enqueue_on_commit

    run = ctx.run
    now = timezone.now()
    with transaction.atomic():
        locked = Run.objects.select_for_update().get(pk=run.pk)
        if locked.status == RunStatus.HALTED:
            _record_what_ran(ctx)  # a tool that executed before the halt stays on the record
            return "stopped"
        if locked.lease_owner != lease or locked.is_final:
            return "stopped"  # another worker took over
        try:
            with transaction.atomic():  # the last steps' finishes commit with the run's state
                ctx.outbox.apply()
        except DatabaseError as exc:
            # Whatever the database refused, the run ends, failed, saying why: it never stays
            # running for the sweep to replay the same refused write forever.
            ctx.outbox.clear()
            refused = f"{type(exc).__name__}: {exc}"
            status, result, wake_at, requeue = RunStatus.FAILED, None, None, False
            error = f"{error or 'The run ended'}; its last steps could not be recorded: {refused}"
        final = status in {RunStatus.COMPLETED, RunStatus.FAILED}
        # A claim clears wake_at, so a due mark now is a run_resume made during this lease: what
        # the run is about to wait for may already have happened. Stay due and go again.
        if status == RunStatus.WAITING and locked.wake_at and locked.wake_at <= now:
            wake_at, requeue = locked.wake_at, True
        fields: dict[str, Any] = {
            "status": status,
            "lease_owner": "",
            "lease_expires_at": None,
            "wake_at": wake_at,
        }
        if final:
            fields.update(result=result, error=error, finished_at=now)
        if status == RunStatus.COMPLETED:
            fields["progress"] = 1.0
        Run.objects.filter(pk=run.pk).update(**fields)
        if status == RunStatus.COMPLETED:
            Event.objects.create(
                run=run, kind="run.completed", message="Run completed.", data={"result": result}
            )
            ledger_append(
                "run.completed",
                actor="engine",
                run_id=run.pk,
                agent_id=run.agent_id,
                workflow=run.workflow,
                outcome="completed",
                payload={"cost_usd": str(locked.cost_usd), "steps": locked.steps},
            )
        elif status == RunStatus.FAILED:
            Event.objects.create(run=run, kind="run.failed", message=error)
            ledger_append(
                "run.failed",
                actor="engine",
                run_id=run.pk,
                agent_id=run.agent_id,
                workflow=run.workflow,
                outcome="failed",
                reason=error[:2000],
                payload={"error": error[:2000]},
            )
        elif status == RunStatus.WAITING and note:
            Event.objects.create(
                run=run, kind="run.waiting", message=f"Waiting: {note}.", data={"reason": note}
            )
        transaction.on_commit(lambda: broadcast_run(run.pk))
        if requeue:
            enqueue_on_commit(run.pk)
        if final and run.parent_id:
            enqueue_on_commit(run.parent_id)
    return status
