"""Advancing a run: take its lease atomically (or do nothing), load its steps in one query, and
replay the workflow from the top until it suspends, completes, fails or its slice ends."""

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from orchestration.canonical import CanonicalError, canonical_json
from orchestration.engine import faults
from orchestration.engine.context import Context
from orchestration.engine.dispatch import enqueue_on_commit
from orchestration.engine.errors import (
    INFRASTRUCTURE_ERRORS,
    BudgetExceeded,
    Halted,
    Interrupted,
    LeaseLost,
    NonDeterminismError,
    SliceEnded,
    Suspend,
    WorkflowMisuse,
    is_outage,
)
from orchestration.engine.steps import lease_expiry
from orchestration.ledger.chain import ledger_append
from orchestration.registry.declare import RegistryError, get_workflow
from orchestration.runs.models import FINAL, Event, Run, RunStatus
from orchestration.runs.realtime import broadcast_run

SLICE_SECONDS = 20.0
CLAIMABLE = [RunStatus.PENDING, RunStatus.RUNNING, RunStatus.WAITING]
INTERRUPTED_RETRY = timedelta(seconds=2)  # a run its database failed under is due again then

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    lease: str
    was_waiting_for: str  # what the run said it waited for, if it waited: not logged twice


def run_claim(run_id: int) -> Claim | None:
    """Take the run's lease if it is runnable, free and due, and mark it running, in one
    transaction: a claimed run is never left looking like one that waits for nobody. A worker
    that dies after this leaves a running run whose lease expires, which the sweep takes up."""
    now = timezone.now()
    with transaction.atomic():
        run = (
            Run.objects.select_for_update()
            .filter(pk=run_id, status__in=CLAIMABLE)
            .filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now))
            .filter(Q(wake_at__isnull=True) | Q(wake_at__lte=now))
            .first()
        )
        if run is None:
            return None
        claim = Claim(lease=uuid.uuid4().hex, was_waiting_for=_waiting_note(run))
        Run.objects.filter(pk=run_id).update(
            status=RunStatus.RUNNING,
            started_at=run.started_at or now,
            lease_owner=claim.lease,
            lease_expires_at=lease_expiry(now),
            swept_at=None,
            wake_at=None,
        )
        if run.started_at is None:
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
        if run.status != RunStatus.RUNNING:
            transaction.on_commit(lambda: broadcast_run(run_id))
    return claim


def run_advance(run_id: int, *, slice_seconds: float = SLICE_SECONDS) -> str:
    """Advance the run as far as it can go now. Returns what happened, for logs and tests."""
    try:
        claim = run_claim(run_id)
    except INFRASTRUCTURE_ERRORS:
        # The connection died under the claim (a drop landing after the task's health check):
        # once more on a new one, rather than leave the run to the sweep's next pass.
        connection.close_if_unusable_or_obsolete()
        claim = run_claim(run_id)
    if claim is None:
        return "skipped"
    faults.point(faults.CLAIMED, run_id)
    ctx = None
    try:
        run = Run.objects.select_related("agent").get(pk=run_id)
        steps = {step.seq: step for step in run.step_set.all()}
        ctx = Context(run, steps, lease=claim.lease, slice_seconds=slice_seconds)
        return _advance(ctx, claim, steps)
    except LeaseLost:  # from _finish: a newer attempt of a step is another worker's
        return "stopped"
    except Interrupted as signal:
        return _interrupted(run_id, claim.lease, ctx, str(signal))
    except INFRASTRUCTURE_ERRORS as exc:
        return _interrupted(run_id, claim.lease, ctx, f"{type(exc).__name__}: {exc}")


def _advance(ctx: Context, claim: Claim, steps: dict) -> str:
    run, lease = ctx.run, claim.lease
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
        note = "" if signal.reason == claim.was_waiting_for else signal.reason
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
    except WorkflowMisuse as exc:
        return _finish(ctx, lease, RunStatus.FAILED, error=str(exc))
    except (RegistryError, CanonicalError) as exc:
        return _finish(ctx, lease, RunStatus.FAILED, error=str(exc))
    except Exception as exc:
        if is_outage(exc):
            raise  # the database, not the workflow, failed: the run is not decided by it
        return _finish(ctx, lease, RunStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
    return _finish(ctx, lease, RunStatus.COMPLETED, result=result)


def _interrupted(run_id: int, lease: str, ctx: Context | None, error: str) -> str:
    """The database failed under this slice. Nothing is decided about the run: once the
    database answers (tried again for up to half a lease), what the slice finished is recorded,
    the lease given back and the run marked due shortly; the interrupted step runs again under
    the same idempotency key. If it does not answer in time, the lease expires and the sweep
    takes the run up then, costing the slice."""
    log.warning("run %s interrupted by the database (%s); it will be advanced again", run_id, error)
    give_up = time.monotonic() + settings.BATON_LEASE_SECONDS / 2
    delay = 0.1
    while True:
        connection.close_if_unusable_or_obsolete()
        try:
            _release_interrupted(run_id, lease, ctx, error)
            return "interrupted"
        except INFRASTRUCTURE_ERRORS:
            if time.monotonic() + delay > give_up:
                connection.close_if_unusable_or_obsolete()
                return "interrupted"
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _release_interrupted(run_id: int, lease: str, ctx: Context | None, error: str) -> None:
    with transaction.atomic():
        released = (
            Run.objects.filter(pk=run_id, lease_owner=lease)
            .exclude(status__in=FINAL)
            .update(
                lease_owner="",
                lease_expires_at=None,
                wake_at=timezone.now() + INTERRUPTED_RETRY,
                swept_at=None,
            )
        )
        halted = not released and Run.objects.filter(pk=run_id, status=RunStatus.HALTED).exists()
        if ctx is not None and (released or halted):
            _record_what_ran(ctx)  # a tool that acted before a halt stays on the record too
        if released:
            _note_interruption(run_id, error)
            transaction.on_commit(lambda: broadcast_run(run_id))


def _note_interruption(run_id: int, error: str) -> None:
    """One timeline entry per spell of interruptions, counting them, so that an outage that
    lasts shows on the run page without flooding it."""
    last = Event.objects.filter(run_id=run_id).order_by("-id").first()
    count = last.data.get("count", 1) + 1 if last and last.kind == "run.interrupted" else 1
    message = f"Interrupted by the database {count} time(s), last: {error[:500]}; continuing."
    if count > 1:
        Event.objects.filter(pk=last.pk).update(message=message, data={"count": count})
    else:
        Event.objects.create(
            run_id=run_id, kind="run.interrupted", message=message, data={"count": 1}
        )


def _record_what_ran(ctx: Context) -> None:
    """In the caller's transaction, on a run halted while this worker advanced it or whose slice
    the database interrupted: the finishes of steps that ran still commit (fenced by attempt,
    so nothing a newer worker did is overwritten); anything the database refuses is dropped
    (the run is over, or those steps run again under their idempotency keys)."""
    try:
        with transaction.atomic():
            ctx.outbox.apply()
    except LeaseLost:
        ctx.outbox.clear()
    except DatabaseError as exc:
        if is_outage(exc):
            raise  # not refused: tried again once the database answers
        ctx.outbox.clear()


def _waiting_note(run: Run) -> str:
    """What a waiting run said it waits for (its last waiting event), to avoid repeating it."""
    if run.status != RunStatus.WAITING:
        return ""
    event = run.events.filter(kind="run.waiting").order_by("-id").first()
    return event.data.get("reason", "") if event else ""


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
    run = ctx.run
    faults.point(faults.FINISHING, run.pk)
    with transaction.atomic():
        locked = Run.objects.select_for_update().get(pk=run.pk)
        now = timezone.now()
        if locked.status == RunStatus.HALTED:
            _record_what_ran(ctx)  # a tool that executed before the halt stays on the record
            return "stopped"
        if locked.lease_owner != lease or locked.is_final:
            return "stopped"  # another worker took over
        try:
            with transaction.atomic():  # the last steps' finishes commit with the run's state
                ctx.outbox.apply()
        except DatabaseError as exc:
            if is_outage(exc):
                raise
            # Whatever the database refused, the run ends, failed, saying why: it never stays
            # running for the sweep to replay the same refused write forever.
            ctx.outbox.clear()
            refused = f"{type(exc).__name__}: {exc}"
            status, result, wake_at, requeue = RunStatus.FAILED, None, None, False
            error = f"{error or 'The run ended'}; its last steps could not be recorded: {refused}"
        final = status in {RunStatus.COMPLETED, RunStatus.FAILED}
        # A claim clears wake_at, so any mark now is a run_resume made during this lease (a
        # decision, an answer, a child's end): what the run is about to wait for may already
        # have happened. Whenever it was stamped, it is never erased: stay due and go again.
        if status == RunStatus.WAITING and locked.wake_at is not None:
            wake_at, requeue = min(locked.wake_at, now), True
        fields: dict[str, Any] = {
            "status": status,
            "lease_owner": "",
            "lease_expires_at": None,
            "wake_at": wake_at,
            "swept_at": None,  # a sweep's mark was for the run's previous state
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
